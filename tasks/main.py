"""Downstream tasks with Megatron-LM's flags: zero-shot GPT evaluation and BERT fine-tuning.

    python tasks/main.py --task TASK [task flags] [model, tokenizer and training flags of pretraining]
    torchrun --nproc_per_node N tasks/main.py --task TASK --tensor-model-parallel-size T \
        --pipeline-model-parallel-size P ...

--task          data (--valid-data / --train-data)                  what it does
WIKITEXT103     one WikiText .tokens/.txt file                      perplexity of the GPT model in --load
LAMBADA         one LAMBADA .jsonl file ({"text": ...} per line)    cloze accuracy of the GPT in --load
RACE            RACE directories of passage files                   fine-tune BERT, accuracy per --valid-data
MNLI, QQP       GLUE .tsv files                                     fine-tune BERT, accuracy per --valid-data

Task flags: --valid-data PATH..., --train-data PATH..., --epochs N (fine-tuning; 0 = evaluate only),
--pretrained-checkpoint DIR (fine-tuning starts from its model weights), --overlapping-eval K (WikiText
stride, default 32), --strict-lambada, --eval-micro-batch-size B (default --micro-batch-size).
--load is the model to evaluate (zero-shot) or a fine-tuning run to resume; --use-checkpoint-args takes
the model and tokenizer flags from it. Fine-tuning length comes from --epochs, so --train-iters and
--train-samples are not given. The work is done in tasks/zeroshot_gpt, tasks/race, tasks/glue.
Any tensor x pipeline x data grid runs; fine-tuning goes through the pipeline schedules (not the
interleaved one, which Megatron-LM's tasks refuse too), and its checkpoints must have the run's TP x PP.

A user error (a flag, a missing or malformed file, a checkpoint that does not fit) is reported in one
line naming the flag, file or line, with a non-zero exit status and no traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

if __package__ in (None, ""):  # run as a script (python tasks/main.py): make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.arguments import build_parser, parse_args  # noqa: E402
from megatron.checkpointing import CheckpointError  # noqa: E402
from megatron.initialize import initialize_megatron  # noqa: E402
from megatron.parallel.pipeline_layout import virtual_pipeline_size  # noqa: E402
from megatron.tokenizer import (  # noqa: E402
    AbstractTokenizer,
    TokenizerConfigError,
    build_tokenizer,
)
from megatron.training import TrainingError  # noqa: E402
from tasks.data_utils import TaskError  # noqa: E402

ZERO_SHOT_TASKS = ("WIKITEXT103", "LAMBADA")
FINETUNE_TASKS = ("RACE", "MNLI", "QQP")


def add_task_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM's task flags (tasks/main.py's get_tasks_args)."""
    g = parser.add_argument_group("tasks")
    g.add_argument("--task", required=True, choices=ZERO_SHOT_TASKS + FINETUNE_TASKS, help="Task to run.")
    g.add_argument("--epochs", type=int, default=None, help="Fine-tuning epochs; 0 evaluates --load only.")
    g.add_argument(
        "--pretrained-checkpoint",
        type=str,
        default=None,
        help="Checkpoint dir whose model weights fine-tuning starts from (optimizer and RNG not read).",
    )
    g.add_argument("--train-data", nargs="+", default=None, help="Fine-tuning training data paths.")
    g.add_argument("--valid-data", nargs="*", default=None, help="Evaluation data paths.")
    g.add_argument(
        "--overlapping-eval",
        type=int,
        default=32,
        help="WIKITEXT103: stride of the sliding windows; each later window scores its last K tokens.",
    )
    g.add_argument(
        "--strict-lambada",
        action="store_true",
        help="LAMBADA: score every token of the last word, tokenized on its own as ' ' + word (default: "
        "the passage's final token only, as Megatron-LM).",
    )
    g.add_argument(
        "--eval-micro-batch-size", type=int, default=None, help="Evaluation batch size (default micro batch)."
    )
    return parser


def check_task_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flags that depend on the task; parser.error (exit 2, no traceback) names the flag."""
    fail = parser.error
    task = args.task
    if args.eval_micro_batch_size is None:
        args.eval_micro_batch_size = args.micro_batch_size
    if args.eval_micro_batch_size <= 0:
        fail(f"--eval-micro-batch-size must be positive, got {args.eval_micro_batch_size}")
    for flag in ("train_data", "valid_data"):
        for path in getattr(args, flag) or []:
            if not os.path.exists(path):
                fail(f"--{flag.replace('_', '-')}: no such file or directory: {path}")
    if virtual_pipeline_size(args) > 1 and task not in ZERO_SHOT_TASKS:
        fail(
            f"--task {task} (fine-tuning) does not run the interleaved schedule, as in Megatron-LM (each "
            "evaluation batch is one micro batch, and interleaving needs a multiple of "
            "--pipeline-model-parallel-size): drop --virtual-pipeline-model-parallel-size / "
            "--num-layers-per-virtual-pipeline-stage"
        )
    if task in ZERO_SHOT_TASKS:
        for flag in ("train_data", "epochs", "pretrained_checkpoint"):
            if getattr(args, flag) is not None:
                fail(f"--{flag.replace('_', '-')} does not apply to --task {task} (zero-shot evaluation)")
        if not args.valid_data or len(args.valid_data) != 1:
            fail(f"--task {task} needs exactly one --valid-data file")
        if not args.load:
            fail(f"--task {task} evaluates a trained GPT: give --load CHECKPOINT_DIR")
        if not 1 <= args.overlapping_eval <= args.seq_length:
            fail(
                f"--overlapping-eval {args.overlapping_eval} must be between 1 and --seq-length {args.seq_length}"
            )
        return
    if args.epochs is None or args.epochs < 0:
        fail(f"--task {task} needs --epochs N (N >= 0; 0 only evaluates)")
    if args.epochs > 0 and not args.train_data:
        fail(f"--task {task} --epochs {args.epochs} needs --train-data")
    if args.epochs > 0 and args.lr is None:
        fail("--lr is required to fine-tune")
    if args.train_iters is not None or args.train_samples is not None:
        fail("--train-iters/--train-samples do not apply to fine-tuning: its length is --epochs")
    if args.lr_decay_samples is not None or args.lr_warmup_samples:
        fail("fine-tuning counts iterations: use --lr-decay-iters/--lr-warmup-iters, not the -samples forms")
    if args.epochs == 0 and not args.valid_data:
        fail("--epochs 0 only evaluates: give --valid-data")
    if args.pretrained_checkpoint is not None and not os.path.isdir(args.pretrained_checkpoint):
        fail(f"--pretrained-checkpoint: no such directory: {args.pretrained_checkpoint}")


def _check_bert_tokenizer(tokenizer: AbstractTokenizer, task: str) -> None:
    try:
        _ = (tokenizer.cls, tokenizer.sep, tokenizer.pad)
    except NotImplementedError as e:
        raise TaskError(
            f"--task {task} builds [CLS] A [SEP] B [SEP] inputs, but {e} "
            "(use --tokenizer-type BertWordPieceLowerCase or BertWordPieceCase)"
        ) from None


def run_task(args: argparse.Namespace) -> dict:
    """Initialise the process groups, build the tokenizer and run the task; returns its results."""
    parallel = initialize_megatron(args)
    tokenizer = build_tokenizer(args)
    if args.task in ZERO_SHOT_TASKS:
        from tasks.zeroshot_gpt import evaluate

        return evaluate.main(args, parallel, tokenizer)
    _check_bert_tokenizer(tokenizer, args.task)
    if args.task == "RACE":
        from tasks.race import finetune as race

        return race.main(args, parallel, tokenizer)
    from tasks.glue import finetune as glue

    return glue.main(args, parallel, tokenizer)


def main(argv: Optional[list[str]] = None) -> dict:
    """Parse the flags and run the task; user errors exit non-zero with a one-line message."""
    # skip_train: pretraining's required --train-iters/--lr do not apply (fine-tuning length is --epochs).
    args = parse_args(argv, add_task_args, defaults={"skip_train": True}, require_data=False)
    check_task_args(build_parser(add_task_args), args)
    try:
        return run_task(args)
    except (TaskError, CheckpointError, TokenizerConfigError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
