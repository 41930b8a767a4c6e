"""Fine-tune a BERT classifier for --epochs over --train-data, evaluating every --valid-data after each epoch.

    finetune(args, parallel, task)

1. Datasets: the samples of all --train-data paths; each --valid-data path is evaluated separately.
2. Length: an iteration consumes one global batch of G = --global-batch-size samples (micro batches of
   --micro-batch-size per data-parallel rank, with gradient accumulation when G > micro x DP);
   an epoch is floor(train samples / G) iterations over a fresh random order (seeded by --seed + epoch;
   the last partial batch is dropped), and the run lasts --epochs x that (a local value, given to the
   learning-rate schedule and saved as `train_iters` in the checkpoint's args, as Megatron-LM saves it).
3. Model: `task.model_provider` (BERT encoder + task head; under pipeline parallelism this rank's stage:
   the embedding on the first, the pooler and head on the last), wrapped for data parallelism, with the
   project's optimizer and learning-rate schedule (--lr, --lr-warmup-fraction/-iters, --lr-decay-style,
   ...). Weights: --load resumes a fine-tuning run (model, optimizer, schedule, position in the data);
   otherwise --pretrained-checkpoint gives the encoder (model weights only, each stage its shard; a head
   missing from it starts from its random initialisation).
4. Each iteration: the micro batches through the pipeline schedule of the grid (megatron.schedules; every
   stage reads the same micro batches), DP gradient all-reduce, optimizer step
   (megatron.training.train_step); loss = cross entropy of the logits against the labels, averaged over
   the micro batch, computed by the schedule's loss function on the last stage.
5. After each epoch: accuracy on each --valid-data (argmax of the logits == label), each batch run
   forward-only through the schedule as one micro batch; the last stage counts, the counts are summed
   exactly over DP ranks and sent to every stage, and the last rank prints them as Megatron-LM does
   (print_rank_last); then a checkpoint in --save (also every --save-interval).

--epochs 0 only evaluates the model of --load or --pretrained-checkpoint.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

from megatron.arguments.llama import flops_shape
from megatron.checkpointing import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from megatron.data.samplers import build_data_loader
from megatron.distributed import DistributedDataParallel
from megatron.lr_scheduler import OptimizerParamScheduler
from megatron.model.utils import hardware_flops
from megatron.optimizer import MegatronOptimizer
from megatron.parallel.collectives import any_rank
from megatron.parallel.state import ParallelState, print_rank_0, print_rank_last
from megatron.pipeline import build_model, forward_only
from megatron.run_state import RunState
from megatron.schedules import broadcast_from_last_stage
from megatron.training import is_last_rank, setup_model_and_optimizer, train_iteration
from megatron.training_log import IntervalLogger, ScalarWriter
from tasks.data_utils import TaskError
from tasks.eval_utils import model_device, sum_over_dataset

ModelProvider = Callable[[argparse.Namespace, ParallelState, RunState], nn.Module]


@dataclass
class FinetuneTask:
    """What a task gives `finetune`: how to read one data path and how to build its model."""

    name: str
    # a --train-data / --valid-data path -> dataset of sample dicts, with a `name` (printed with its accuracy)
    build_dataset: Callable[[str], Dataset]
    model_provider: ModelProvider
    # RACE: 4 (one sequence per choice), for the stages' activation shape and the FLOP count in the log
    sequences_per_sample: int = 1


def _model_output(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(the model's output on the batch: logits on the last stage, hidden states before it; the labels)."""
    device = model_device(model)
    output = model(batch["text"].to(device), batch["padding_mask"].to(device), batch["types"].to(device))
    return output, batch["label"].to(device)


def _loss_func(labels: Tensor, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    loss = F.cross_entropy(logits.float(), labels)
    return loss, {"lm loss": loss.detach()}


def forward_step(
    data_iterator: Iterator, model: nn.Module, args: argparse.Namespace, parallel: ParallelState
) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]]]:
    """One micro batch: the output and the cross-entropy loss function (megatron.training's interface;
    the schedule applies the loss function on the last stage only)."""
    output, labels = _model_output(model, next(data_iterator))
    return output, partial(_loss_func, labels)


def _count_correct(labels: Tensor, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    correct = (logits.argmax(dim=-1) == labels).sum()
    return correct, {"correct": correct}


def _accuracy_forward_step(
    data_iterator: Iterator, model: nn.Module, args: argparse.Namespace, parallel: ParallelState
) -> tuple[Tensor, Callable[[Tensor], tuple[Tensor, dict[str, Tensor]]]]:
    """One evaluation batch: the output and a "loss" function that counts argmax(logits) == label."""
    output, labels = _model_output(model, next(data_iterator))
    return output, partial(_count_correct, labels)


def evaluate_accuracy(
    model: nn.Module,
    dataset: Dataset,
    args: argparse.Namespace,
    parallel: ParallelState,
    sequences_per_sample: int = 1,
) -> tuple[int, int]:
    """(correct, total) over the whole dataset in batches of --eval-micro-batch-size, dropout off; the
    same on every rank.

    Each batch (the last one of a DP rank may be shorter) goes forward-only through the schedule as one
    micro batch of len(batch) x `sequences_per_sample` sequences, so under pipelining only the last stage
    counts; the counts are summed over DP ranks (tasks.eval_utils.sum_over_dataset) and the last stage's
    total is broadcast to every stage of the pipeline.
    """

    def batch_correct(module: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        sequences = len(batch["label"]) * sequences_per_sample
        stats = forward_only(_accuracy_forward_step, iter([batch]), module, 1, args, parallel, sequences)
        return sum((s["correct"].cpu() for s in stats), torch.zeros((), dtype=torch.long))

    was_training = model.training
    model.eval()
    correct = sum_over_dataset(dataset, batch_correct, model, args.eval_micro_batch_size, parallel)
    model.train(was_training)
    correct = broadcast_from_last_stage({"correct": correct}, parallel)["correct"]
    return int(correct), len(dataset)  # type: ignore[arg-type]


def split_micro_batches(
    batches: Iterator[dict[str, Tensor]], num_micro_batches: int
) -> Iterator[dict[str, Tensor]]:
    """Cut each batch (this rank's share of one global batch) into `num_micro_batches` equal micro batches."""
    for batch in batches:
        for chunks in zip(*(tensor.chunk(num_micro_batches) for tensor in batch.values())):
            yield dict(zip(batch, chunks))


def train_batches(
    dataset: Dataset, args: argparse.Namespace, parallel: ParallelState, iteration: int
) -> Iterator[dict[str, Tensor]]:
    """Micro batches from `iteration` on, epoch after epoch (module docstring, item 2).

    The shuffling sampler yields this DP rank's slice of each global batch (G / DP samples, in an order
    drawn from --seed + epoch), which is cut into the micro batches of one iteration.
    """
    per_rank = args.global_batch_size // parallel.dp_size
    loader = build_data_loader(
        dataset,
        iteration * args.global_batch_size,
        per_rank,
        parallel.dp_rank,
        parallel.dp_size,
        args.num_workers,
        "cyclic",
        args.seed,
    )
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    return split_micro_batches(batches, per_rank // args.micro_batch_size)


def load_pretrained(model: nn.Module, checkpoint_dir: str, parallel: ParallelState) -> None:
    """Load the model weights of `checkpoint_dir` (e.g. pretrained BERT) into the task model.

    Every encoder weight (`language_model.*`) must be in the checkpoint; task-head weights that are not
    keep their random initialisation, and checkpoint weights the model lacks (BERT's LM and
    next-sentence heads) are ignored. Optimizer and RNG states are not read.
    """
    if read_metadata(checkpoint_dir) is None:
        raise CheckpointError(
            f"--pretrained-checkpoint {checkpoint_dir}: no latest_checkpointed_iteration.txt there"
        )
    reports = []
    handle = model.register_load_state_dict_post_hook(lambda module, keys: reports.append(keys))
    try:
        load_checkpoint(
            model, None, None, checkpoint_dir, parallel, no_load_rng=True, finetune=True, strict=False
        )
    finally:
        handle.remove()
    missing = reports[-1].missing_keys
    encoder = [key for key in missing if key.startswith("language_model.")]
    if any_rank(bool(encoder)):  # every rank stops, also the stages whose shard was complete
        what = f"encoder weights {encoder[:4]}{' ...' if len(encoder) > 4 else ''}" if encoder else (
            "encoder weights of another pipeline stage"
        )  # fmt: skip
        raise CheckpointError(
            f"--pretrained-checkpoint {checkpoint_dir} lacks {what}: not a BERT checkpoint of this model's "
            "shape (for BERT trained with --bert-no-binary-head there is no pooler to start from)"
        )
    if missing:  # the task head, on the last stage
        print_rank_last(
            parallel, f"> {', '.join(missing)} not in the pretrained checkpoint: randomly initialised"
        )


def _train_iters(args: argparse.Namespace, num_train_samples: int) -> tuple[int, int]:
    """(iterations per epoch, iterations of the run = --epochs x that), checked against the LR flags."""
    iters_per_epoch = num_train_samples // args.global_batch_size
    if iters_per_epoch == 0:
        raise TaskError(
            f"--train-data has {num_train_samples} samples, fewer than one --global-batch-size "
            f"{args.global_batch_size}"
        )
    train_iters = args.epochs * iters_per_epoch
    if args.lr_warmup_iters >= (args.lr_decay_iters or train_iters):
        raise TaskError(
            f"--lr-warmup-iters {args.lr_warmup_iters} must be below --lr-decay-iters (default: --epochs x "
            f"iterations per epoch = {train_iters})"
        )
    return iters_per_epoch, train_iters


def _report_accuracy(
    model: nn.Module,
    valid_sets: list[Dataset],
    args: argparse.Namespace,
    parallel: ParallelState,
    task: FinetuneTask,
    epoch: int,
) -> dict[str, tuple[int, int]]:
    """Evaluate every validation set, print Megatron's metric lines from the last rank (a last stage),
    return {name: (correct, total)} (the same on every rank)."""
    results = {}
    for dataset in valid_sets:
        start = time.time()
        correct, total = evaluate_accuracy(model, dataset, args, parallel, task.sequences_per_sample)
        results[dataset.name] = (correct, total)
        print_rank_last(
            parallel,
            f" > |epoch: {epoch}| metrics for {dataset.name}: correct / total = {correct} / {total} = "
            f"{100.0 * correct / total:.4f} %, elapsed time (sec): {time.time() - start:.3f}",
        )
    correct = sum(c for c, _ in results.values())
    total = sum(t for _, t in results.values())
    if total:
        print_rank_last(
            parallel,
            f" >> |epoch: {epoch}| overall: correct / total = {correct} / {total} = {100.0 * correct / total:.4f} %",
        )
    return results


def finetune(args: argparse.Namespace, parallel: ParallelState, task: FinetuneTask, run: RunState) -> dict:
    """Fine-tune and/or evaluate (module docstring); `run` counts the iterations. Returns {"iteration", "losses": [per iteration],
    "accuracy": [{valid path: (correct, total)} per evaluation]} for scripts and tests."""
    valid_sets = [task.build_dataset(path) for path in args.valid_data or []]
    summary: dict = {"iteration": 0, "losses": [], "accuracy": []}
    if args.epochs == 0:
        model = _model_for_evaluation(args, parallel, task, run)
        summary["accuracy"].append(_report_accuracy(model, valid_sets, args, parallel, task, epoch=0))
        return summary

    train_set = ConcatDataset([task.build_dataset(path) for path in args.train_data])
    iters_per_epoch, train_iters = _train_iters(args, len(train_set))
    print_rank_0(
        parallel,
        f"> {task.name}: {len(train_set)} training samples, {iters_per_epoch} iterations per epoch of "
        f"{args.global_batch_size}, {args.epochs} epochs",
    )
    model, optimizer, scheduler = setup_model_and_optimizer(
        task.model_provider, args, parallel, run, train_iters
    )
    if args.load:
        iteration, _ = load_checkpoint(
            model.module, optimizer, scheduler, args.load, parallel,
            no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng, finetune=args.finetune,
            run_args=run.checkpoint_args(args),
        )  # fmt: skip
        run.iteration, run.consumed_train_samples = iteration, iteration * args.global_batch_size
    if run.iteration == 0 and args.pretrained_checkpoint:
        load_pretrained(model.module, args.pretrained_checkpoint, parallel)
        optimizer.reload_model_params()  # the fp32 main copies of a bf16/fp16 model follow the new weights
    summary["iteration"] = run.iteration
    _train(model, optimizer, scheduler, train_set, valid_sets, (iters_per_epoch, train_iters), args, parallel,
           run, task, summary)  # fmt: skip
    return summary


def _train(
    model: DistributedDataParallel,
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    train_set: Dataset,
    valid_sets: list[Dataset],
    length: tuple[int, int],
    args: argparse.Namespace,
    parallel: ParallelState,
    run: RunState,
    task: FinetuneTask,
    summary: dict,
) -> None:
    """Iterations `run.iteration` .. the run's length (module docstring, items 4 and 5); `length` is
    (iterations per epoch, iterations of the run); fills `summary`."""
    iters_per_epoch, train_iters = length

    def save() -> None:
        if args.save:
            saved_args = run.checkpoint_args(args)
            saved_args.train_iters = train_iters  # a copy: Megatron-LM's checkpoints record the run's length
            save_checkpoint(run.iteration, model.module, optimizer, scheduler, saved_args, parallel, args.save,
                            save_optim=not args.no_save_optim, save_rng=not args.no_save_rng)  # fmt: skip

    data = train_batches(train_set, args, parallel, run.iteration)
    flops = hardware_flops(args.global_batch_size * task.sequences_per_sample, args.seq_length, args.num_layers,
                           args.hidden_size, 0, args.recompute_granularity, **flops_shape(args))  # fmt: skip
    writer = ScalarWriter(args, is_last_rank())
    logger = IntervalLogger(args, train_iters, writer, partial(print_rank_last, parallel))
    model.train()
    sequences = args.micro_batch_size * task.sequences_per_sample  # one micro batch through the stages
    while run.iteration < train_iters:
        losses = train_iteration(forward_step, data, model, optimizer, scheduler, args.global_batch_size, args,
                                 parallel, run, logger, flops, sequences)  # fmt: skip
        summary["iteration"] = run.iteration
        summary["losses"].append(losses)
        if run.iteration % iters_per_epoch == 0:
            epoch = run.iteration // iters_per_epoch
            summary["accuracy"].append(_report_accuracy(model, valid_sets, args, parallel, task, epoch))
            save()
        elif args.save_interval and run.iteration % args.save_interval == 0:
            save()
    writer.close()


def _model_for_evaluation(
    args: argparse.Namespace, parallel: ParallelState, task: FinetuneTask, run: RunState
) -> nn.Module:
    """The task model with the weights of --load (a fine-tuned checkpoint) or --pretrained-checkpoint."""
    if not (args.load or args.pretrained_checkpoint):
        raise TaskError("--epochs 0 evaluates a trained model: give --load or --pretrained-checkpoint")
    model = build_model(task.model_provider, args, parallel, run).to(dtype=args.params_dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    if args.load:
        if read_metadata(args.load) is None:
            raise CheckpointError(f"--load {args.load}: no latest_checkpointed_iteration.txt there")
        load_checkpoint(model, None, None, args.load, parallel, no_load_optim=True, no_load_rng=True,
                        run_args=run.checkpoint_args(args))  # fmt: skip
    else:
        load_pretrained(model, args.pretrained_checkpoint, parallel)
    return model
