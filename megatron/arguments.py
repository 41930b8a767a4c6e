"""Command-line arguments with Megatron-LM's flag names, validated once into an explicit config.

`parse_args(argv)` returns an `argparse.Namespace` whose attribute names are Megatron's (it is saved as
`args` in every checkpoint, where converters written for Megatron read it). Every inconsistency between
flags is reported by `parser.error`, which prints one line naming the flags and a pointer to --help, and
exits with status 2: no traceback for a user mistake. Typed views for the subsystems are derived from it by
`transformer_config_from_args` and `optimizer_config_from_args`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Callable, NoReturn, Optional

import torch

from megatron.arguments_llama import add_llama_args, validate_llama_args
from megatron.compat_args import add_compat_args, check_compat_args
from megatron.model.config import TransformerConfig
from megatron.parallel.pipeline_layout import check_pipeline_args

ExtraArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]

# Attributes taken from a checkpoint's saved args with --use-checkpoint-args: the model's shape and
# numerics, and the tokenizer it was trained with.
CHECKPOINT_MODEL_ARGS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "kv_channels",
    "max_position_embeddings",
    "position_embedding_type",
    "rotary_base",
    "rotary_percent",
    "normalization",
    "swiglu",
    "group_query_attention",
    "num_query_groups",
    "add_bias_linear",
    "untie_embeddings_and_output_weights",
    "embedding_layernorm",
    "apply_residual_connection_post_layernorm",
    "fp32_residual_connection",
    "openai_gelu",
    "bias_gelu_fusion",
    "layernorm_epsilon",
    "make_vocab_size_divisible_by",
    "padded_vocab_size",
    "tokenizer_type",
    "vocab_file",
    "merge_file",
    "tokenizer_model",
    "vocab_size",
    "bert_binary_head",
    "num_tokentypes",
)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line and a pointer to --help (not the 100-line usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def build_parser(extra_args_provider: Optional[ExtraArgsProvider] = None) -> argparse.ArgumentParser:
    """All of Megatron's flags that this project implements, grouped as in Megatron's --help."""
    parser = ArgumentParser(description="Megatron-style GPT/BERT pretraining arguments", allow_abbrev=False)
    _add_network_args(parser)
    add_llama_args(parser)
    _add_regularization_args(parser)
    _add_training_args(parser)
    _add_initialization_args(parser)
    _add_learning_rate_args(parser)
    _add_checkpointing_args(parser)
    _add_mixed_precision_args(parser)
    _add_distributed_args(parser)
    _add_validation_args(parser)
    _add_data_args(parser)
    _add_logging_args(parser)
    add_compat_args(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser


def _add_network_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("network size")
    g.add_argument("--num-layers", type=int, default=None, help="Number of transformer layers.")
    g.add_argument("--hidden-size", type=int, default=None, help="Transformer hidden size.")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="MLP hidden size (default 4 * hidden).")
    g.add_argument("--num-attention-heads", type=int, default=None, help="Number of attention heads.")
    g.add_argument("--kv-channels", type=int, default=None, help="Per-head size (default hidden / heads).")
    g.add_argument("--seq-length", type=int, default=None, help="Maximum sequence length to process.")
    g.add_argument(
        "--max-position-embeddings", type=int, default=None, help="Position embeddings (default seq-length)."
    )
    g.add_argument(
        "--position-embedding-type",
        choices=["learned_absolute", "rope", "alibi"],
        default="learned_absolute",
        help="Learned absolute position embeddings, rotary (RoPE), or BLOOM's ALiBi attention biases.",
    )
    g.add_argument(
        "--embedding-layernorm", action="store_true", help="BLOOM: layernorm after the word embeddings."
    )
    g.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="Pad the vocabulary to a multiple of this value times the TP size.",
    )
    g.add_argument("--layernorm-epsilon", type=float, default=1e-5, help="Layer norm epsilon.")
    g.add_argument(
        "--apply-residual-connection-post-layernorm",
        action="store_true",
        help="Residual from the layernorm output (original BERT/GPT order) instead of its input.",
    )
    g.add_argument("--openai-gelu", action="store_true", help="GeLU in OpenAI's tanh form.")
    g.add_argument(
        "--no-bias-gelu-fusion",
        action="store_false",
        dest="bias_gelu_fusion",
        help="Exact erf GeLU instead of the fused bias+GeLU tanh form.",
    )
    g.add_argument(
        "--fp32-residual-connection", action="store_true", help="Keep the residual stream in fp32."
    )
    g.add_argument(
        "--bert-no-binary-head",
        action="store_false",
        dest="bert_binary_head",
        help="BERT without the next-sentence binary head.",
    )


def _check_model_args(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> None:
    """Model shape (divisible over the TP size) and dropout; fills ffn_hidden_size, kv_channels, max positions."""
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if getattr(args, flag) is None:
            fail(f"--{flag.replace('_', '-')} is required")
        if getattr(args, flag) <= 0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    tp = args.tensor_model_parallel_size
    if args.hidden_size % args.num_attention_heads != 0 and args.kv_channels is None:
        fail(
            f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
            f"{args.num_attention_heads} (or give --kv-channels)"
        )
    if args.num_attention_heads % tp != 0:
        fail(
            f"--num-attention-heads {args.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}"
        )
    validate_llama_args(args, fail)
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.ffn_hidden_size % tp != 0:
        fail(
            f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}"
        )
    if args.kv_channels is None:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.position_embedding_type == "learned_absolute" and args.seq_length > args.max_position_embeddings:
        fail(
            f"--seq-length {args.seq_length} exceeds --max-position-embeddings {args.max_position_embeddings}"
        )
    for flag in ("attention_dropout", "hidden_dropout"):
        value = getattr(args, flag)
        if not 0.0 <= value < 1.0:
            fail(f"--{flag.replace('_', '-')} must be in [0, 1), got {value}")
    if args.sequence_parallel and tp == 1:
        if launcher_ranks()[0] == 0:
            print("note: --sequence-parallel ignored: it needs --tensor-model-parallel-size > 1", flush=True)
        args.sequence_parallel = False
    if args.sequence_parallel and args.seq_length % tp != 0:
        fail(
            f"--sequence-parallel splits the sequence over the tensor-parallel ranks: --seq-length "
            f"{args.seq_length} is not divisible by --tensor-model-parallel-size {tp}"
        )


def _add_regularization_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("regularization")
    g.add_argument("--attention-dropout", type=float, default=0.1, help="Dropout on attention probabilities.")
    g.add_argument("--hidden-dropout", type=float, default=0.1, help="Dropout on hidden states.")
    g.add_argument("--weight-decay", type=float, default=0.01, help="Decoupled weight decay coefficient.")
    g.add_argument("--start-weight-decay", type=float, default=None, help="Initial weight decay.")
    g.add_argument("--end-weight-decay", type=float, default=None, help="Final weight decay.")
    g.add_argument("--weight-decay-incr-style", choices=["constant", "linear", "cosine"], default="constant")
    g.add_argument("--clip-grad", type=float, default=1.0, help="Clip gradients to this global L2 norm.")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None, help="Batch size per model instance.")
    g.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="Training batch size (default micro-batch-size x data-parallel size).",
    )
    g.add_argument(
        "--rampup-batch-size",
        nargs=3,
        default=None,
        metavar=("START", "INCREMENT", "SAMPLES"),
        help="Ramp the global batch from START by INCREMENT over SAMPLES samples.",
    )
    g.add_argument("--recompute-activations", action="store_true", help="Selective activation recompute.")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--train-iters", type=int, default=None, help="Total iterations to train.")
    g.add_argument("--train-samples", type=int, default=None, help="Total samples to train.")
    g.add_argument("--log-interval", type=int, default=100, help="Iterations between log lines.")
    g.add_argument(
        "--exit-interval", type=int, default=None, help="Checkpoint and exit at multiples of this."
    )
    g.add_argument(
        "--exit-duration-in-mins", type=float, default=None, help="Checkpoint and exit after this."
    )
    g.add_argument(
        "--max-nan-iterations",
        type=int,
        default=10,
        help="Stop after this many consecutive iterations with a NaN/inf loss or gradient.",
    )
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    g.add_argument("--dataloader-type", choices=["single", "cyclic"], default="single")
    g.add_argument("--num-workers", type=int, default=0, help="Data loader worker processes.")


def _check_training_args(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> None:
    """Batch sizes (global = micro x DP x accumulation steps), rampup, recompute, run length."""
    if args.micro_batch_size is None:
        fail("--micro-batch-size is required")
    if args.micro_batch_size <= 0:
        fail(f"--micro-batch-size must be positive, got {args.micro_batch_size}")
    # Batch sizes: global = micro x DP x gradient-accumulation steps.
    unit = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = unit
    if args.global_batch_size <= 0 or args.global_batch_size % unit != 0:
        fail(
            f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size}"
        )
    if args.rampup_batch_size is not None:
        try:
            start, incr, samples = (int(v) for v in args.rampup_batch_size)
        except ValueError:
            fail(f"--rampup-batch-size expects three integers, got {' '.join(args.rampup_batch_size)}")
        if start <= 0 or incr <= 0 or samples < 0:
            fail("--rampup-batch-size START INCREMENT SAMPLES must be positive")
        if start % unit != 0 or incr % unit != 0 or (args.global_batch_size - start) % incr != 0:
            fail(
                f"--rampup-batch-size {start} {incr}: start and increment must be multiples of micro batch x DP "
                f"({unit}) and reach --global-batch-size {args.global_batch_size} in whole increments"
            )
        args.rampup_batch_size = [start, incr, samples]

    if args.recompute_activations:
        args.recompute_granularity = "selective"
    # Iterations or samples, not both.
    if args.train_iters is not None and args.train_samples is not None:
        fail("give --train-iters or --train-samples, not both")
    if args.train_iters is not None and args.rampup_batch_size is not None:
        fail("--rampup-batch-size needs --train-samples (iterations are ill-defined while the batch grows)")
    if args.train_iters is None and args.train_samples is None and not args.skip_train:
        fail("one of --train-iters or --train-samples is required")


def _add_initialization_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("initialization")
    g.add_argument("--seed", type=int, default=1234, help="Random seed for python, numpy, torch.")
    g.add_argument("--init-method-std", type=float, default=0.02, help="Std of the normal initialisation.")


def _add_learning_rate_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("learning rate")
    g.add_argument("--lr", type=float, default=None, help="Peak learning rate.")
    g.add_argument(
        "--lr-decay-style",
        choices=["constant", "linear", "cosine", "inverse-square-root"],
        default="linear",
    )
    g.add_argument("--lr-decay-iters", type=int, default=None, help="Decay over this many iterations.")
    g.add_argument("--lr-decay-samples", type=int, default=None, help="Decay over this many samples.")
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="Warmup as a fraction of decay.")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="Warmup iterations.")
    g.add_argument("--lr-warmup-samples", type=int, default=0, help="Warmup samples.")
    g.add_argument("--lr-warmup-init", type=float, default=0.0, help="Learning rate at the start of warmup.")
    g.add_argument("--min-lr", type=float, default=0.0, help="Floor of the learning rate.")
    g.add_argument("--override-opt-param-scheduler", action="store_true")
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true")


def _check_learning_rate_args(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> None:
    """Warmup and decay in the unit of the run length (iterations or samples), lr range, weight decay."""
    if args.lr_warmup_fraction is not None and (args.lr_warmup_iters or args.lr_warmup_samples):
        fail("--lr-warmup-fraction cannot be combined with --lr-warmup-iters or --lr-warmup-samples")
    if args.train_iters is not None and (args.lr_decay_samples is not None or args.lr_warmup_samples):
        fail("with --train-iters, give --lr-decay-iters / --lr-warmup-iters (not the -samples forms)")
    if args.train_samples is not None and (args.lr_decay_iters is not None or args.lr_warmup_iters):
        fail("with --train-samples, give --lr-decay-samples / --lr-warmup-samples (not the -iters forms)")
    if args.train_iters is not None and args.lr_warmup_iters >= (args.lr_decay_iters or args.train_iters):
        fail(
            f"--lr-warmup-iters {args.lr_warmup_iters} must be smaller than --lr-decay-iters "
            f"(default --train-iters) {args.lr_decay_iters or args.train_iters}"
        )
    if args.train_samples is not None and args.lr_warmup_samples >= (
        args.lr_decay_samples or args.train_samples
    ):
        fail("--lr-warmup-samples must be smaller than --lr-decay-samples (default --train-samples)")
    if args.lr is None and not args.skip_train:
        fail("--lr is required")
    if args.lr is not None and args.min_lr > args.lr:
        fail(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.start_weight_decay is None:
        args.start_weight_decay = args.weight_decay
    if args.end_weight_decay is None:
        args.end_weight_decay = args.weight_decay


def _add_checkpointing_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpointing")
    g.add_argument("--save", type=str, default=None, help="Directory to save checkpoints to.")
    g.add_argument("--save-interval", type=int, default=None, help="Iterations between checkpoints.")
    g.add_argument("--no-save-optim", action="store_true", help="Do not save the optimizer state.")
    g.add_argument("--no-save-rng", action="store_true", help="Do not save the RNG state.")
    g.add_argument("--load", type=str, default=None, help="Directory to load a checkpoint from.")
    g.add_argument("--no-load-optim", action="store_true", help="Do not load the optimizer state.")
    g.add_argument("--no-load-rng", action="store_true", help="Do not load the RNG state.")
    g.add_argument(
        "--finetune",
        action="store_true",
        help="Load model weights only; reset iteration, optimizer and RNG.",
    )
    g.add_argument(
        "--use-checkpoint-args",
        action="store_true",
        help="Take the model and tokenizer arguments from the checkpoint in --load.",
    )


def _check_checkpointing_args(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> None:
    """Save/load flags, and the logging and evaluation intervals."""
    if args.save_interval is not None and args.save_interval <= 0:
        fail("--save-interval must be positive")
    if args.save_interval is not None and args.save is None:
        fail("--save-interval needs --save DIR")
    if args.log_interval <= 0 or args.eval_interval <= 0 or args.eval_iters < 0:
        fail("--log-interval and --eval-interval must be positive and --eval-iters non-negative")
    if args.finetune and not args.load:
        fail("--finetune needs --load DIR")


def _add_mixed_precision_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mixed precision")
    g.add_argument("--fp16", action="store_true", help="fp16 model with fp32 main weights and loss scaling.")
    g.add_argument("--bf16", action="store_true", help="bf16 model with fp32 main weights and fp32 grads.")
    g.add_argument("--loss-scale", type=float, default=None, help="Static loss scale (default dynamic).")
    g.add_argument("--initial-loss-scale", type=float, default=2**32, help="Initial dynamic loss scale.")
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="Minimum dynamic loss scale.")
    g.add_argument("--loss-scale-window", type=int, default=1000, help="Clean steps before the scale grows.")
    g.add_argument("--hysteresis", type=int, default=2, help="Overflows tolerated before the scale drops.")


def _check_mixed_precision_args(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> None:
    """One of fp16/bf16; the parameter dtype."""
    if args.fp16 and args.bf16:
        fail("--fp16 and --bf16 are mutually exclusive")
    if args.loss_scale is not None and not args.fp16:
        fail("--loss-scale only applies with --fp16")
    args.params_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def _add_distributed_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="Tensor model parallel degree.")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="Pipeline stages.")
    g.add_argument(
        "--virtual-pipeline-model-parallel-size", type=int, default=None,
        help="Model chunks per pipeline stage (interleaved 1F1B).",
    )  # fmt: skip
    g.add_argument(
        "--num-layers-per-virtual-pipeline-stage", type=int, default=None,
        help="Layers per virtual stage (the classic way to ask for interleaving).",
    )  # fmt: skip
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None, help="Layers of stage 0.")
    g.add_argument(
        "--decoder-last-pipeline-num-layers", type=int, default=None, help="Layers of the last stage."
    )
    g.add_argument(
        "--distributed-backend",
        choices=["nccl", "gloo"],
        default=None,
        help="Default: nccl with CUDA, gloo otherwise.",
    )
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--local-rank", type=int, default=None, help="Set by the launcher.")
    g.add_argument(
        "--no-overlap-grad-reduce",
        action="store_false",
        dest="overlap_grad_reduce",
        help="All-reduce gradients after the backward pass instead of overlapping with it.",
    )
    g.add_argument("--ddp-bucket-size", type=int, default=40_000_000, help="Elements per gradient bucket.")
    g.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="With tensor parallelism: layernorm, dropout and residual on s/t of the sequence each.",
    )
    g.add_argument(
        "--use-distributed-optimizer",
        action="store_true",
        help="ZeRO-1: shard the fp32 main weights and Adam state over the data-parallel group.",
    )
    g.add_argument(
        "--overlap-param-gather",
        action="store_true",
        help="Overlap the distributed optimizer's parameter all-gather with the next forward pass.",
    )


def _check_pipeline_args(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> None:
    """The split of --num-layers over the stages (and virtual stages) and the microbatches it needs."""
    try:
        check_pipeline_args(args, args.global_batch_size // (args.micro_batch_size * args.data_parallel_size))
    except ValueError as e:
        fail(str(e))


def _check_distributed_args(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> None:
    """The TP x PP x DP grid of the world size, and the backend; fills data_parallel_size."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1:
        fail(f"--tensor-model-parallel-size must be >= 1, got {tp}")
    if pp < 1:
        fail(f"--pipeline-model-parallel-size must be >= 1, got {pp}")
    if tp > args.world_size:
        fail(f"--tensor-model-parallel-size {tp} is larger than the world size {args.world_size}")
    if args.world_size % (tp * pp) != 0:
        fail(
            f"world size {args.world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}"
        )
    args.data_parallel_size = args.world_size // (tp * pp)
    if args.distributed_backend == "nccl" and args.world_size > 1 and not torch.cuda.is_available():
        fail(
            "--distributed-backend nccl needs CUDA GPUs, and none is visible: use --distributed-backend gloo"
        )
    if args.use_distributed_optimizer and args.optimizer != "adam":
        fail(
            f"--use-distributed-optimizer shards Adam's state only: --optimizer {args.optimizer} cannot be sharded"
        )
    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        fail(
            "--overlap-param-gather needs --use-distributed-optimizer (and the default --overlap-grad-reduce)"
        )


def _add_validation_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("validation")
    g.add_argument("--eval-iters", type=int, default=100, help="Iterations per evaluation.")
    g.add_argument("--eval-interval", type=int, default=1000, help="Iterations between evaluations.")
    g.add_argument("--skip-train", action="store_true", help="Only evaluate.")


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data and tokenizer")
    g.add_argument(
        "--data-path",
        nargs="*",
        default=None,
        help="One dataset prefix, or weights and prefixes: 0.3 a_text_document 0.7 b_text_document.",
    )
    g.add_argument("--split", type=str, default="969, 30, 1", help="Train/valid/test proportions.")
    g.add_argument("--data-cache-path", type=str, default=None, help="Where to cache sample indices.")
    g.add_argument("--mock-data", action="store_true", help="Synthetic data instead of --data-path.")
    g.add_argument(
        "--tokenizer-type",
        choices=[
            "GPT2BPETokenizer",
            "BertWordPieceLowerCase",
            "BertWordPieceCase",
            "SentencePieceTokenizer",
            "HuggingFaceTokenizer",
            "Llama2Tokenizer",
            "NullTokenizer",
        ],
        default=None,
    )
    g.add_argument("--vocab-file", type=str, default=None, help="Vocabulary file.")
    g.add_argument("--merge-file", type=str, default=None, help="BPE merges file.")
    g.add_argument("--tokenizer-model", type=str, default=None, help="SentencePiece model or HF tokenizer.")
    g.add_argument("--vocab-size", type=int, default=None, help="Vocabulary size for NullTokenizer.")
    g.add_argument("--vocab-extra-ids", type=int, default=0)
    g.add_argument("--mask-prob", type=float, default=0.15, help="BERT: fraction of tokens masked.")
    g.add_argument("--short-seq-prob", type=float, default=0.1, help="BERT: probability of a short sample.")
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")
    g.add_argument("--eod-mask-loss", action="store_true", help="Do not train on end-of-document tokens.")


def _check_data_args(args: argparse.Namespace, fail: Callable[[str], NoReturn], require_data: bool) -> None:
    """--data-path (pairs of weight and prefix, files present), --mock-data, --split, the tokenizer's files."""
    if require_data and not args.mock_data and not args.data_path:
        fail("give --data-path PREFIX (or weights and prefixes), or --mock-data")
    if args.data_path and args.mock_data:
        fail("--data-path and --mock-data are mutually exclusive")
    if args.data_path and len(args.data_path) > 1:
        if len(args.data_path) % 2 != 0:
            fail("--data-path with several datasets takes pairs: WEIGHT PREFIX WEIGHT PREFIX ...")
        for weight in args.data_path[0::2]:
            try:
                float(weight)
            except ValueError:
                fail(f"--data-path: expected a weight, got {weight!r} (pairs: WEIGHT PREFIX ...)")
    if args.data_path:
        prefixes = args.data_path if len(args.data_path) == 1 else args.data_path[1::2]
        for prefix in prefixes:
            missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
            if missing:
                fail(
                    f"--data-path {prefix}: no {' or '.join(prefix + ext for ext in missing)} (give the prefix "
                    "that tools/preprocess_data.py wrote, e.g. corpus_text_document)"
                )
    try:
        split = [float(s) for s in args.split.replace("/", ",").split(",") if s.strip()]
    except ValueError:
        fail(f"--split {args.split!r} must be comma-separated numbers such as 969,30,1")
    if not split or any(s < 0 for s in split) or sum(split) <= 0:
        fail(f"--split {args.split!r} must be non-negative numbers with a positive sum")
    if args.tokenizer_type is None and args.vocab_size is not None:
        args.tokenizer_type = "NullTokenizer"
    if args.tokenizer_type is None:
        fail("--tokenizer-type is required (or --vocab-size for NullTokenizer)")
    needs = {
        "GPT2BPETokenizer": ("vocab_file", "merge_file"),
        "BertWordPieceLowerCase": ("vocab_file",),
        "BertWordPieceCase": ("vocab_file",),
        "SentencePieceTokenizer": ("tokenizer_model",),
        "HuggingFaceTokenizer": ("tokenizer_model",),
        "Llama2Tokenizer": ("tokenizer_model",),
        "NullTokenizer": ("vocab_size",),
    }[args.tokenizer_type]
    for flag in needs:
        if getattr(args, flag) is None:
            fail(f"--tokenizer-type {args.tokenizer_type} needs --{flag.replace('_', '-')}")


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("logging")
    g.add_argument("--tensorboard-dir", type=str, default=None, help="Write TensorBoard scalars here.")
    g.add_argument("--tensorboard-log-interval", type=int, default=1)
    g.add_argument("--wandb-project", type=str, default=None, help="Weights & Biases project (if installed).")
    g.add_argument("--wandb-exp-name", type=str, default=None)
    g.add_argument(
        "--log-timers-to-tensorboard",
        action="store_true",
        help="Write the forward-backward, optimizer and iteration times to TensorBoard.",
    )
    g.add_argument(
        "--log-memory-to-tensorboard",
        action="store_true",
        help="Write CUDA allocator statistics (peak resident memory without CUDA) to TensorBoard.",
    )
    g.add_argument(
        "--log-num-zeros-in-grad",
        action="store_true",
        help="Log the number of zero gradient elements (over the whole model).",
    )
    g.add_argument("--log-params-norm", action="store_true", help="Log the L2 norm of the parameters.")


def launcher_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM (SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID) announce them; (0, 1, 0) for a process started on its own."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def world_size_from_env() -> int:
    return launcher_ranks()[1]


def parse_args(
    argv: Optional[Sequence[str]] = None,
    extra_args_provider: Optional[ExtraArgsProvider] = None,
    defaults: Optional[dict] = None,
    world_size: Optional[int] = None,
    require_data: bool = True,
) -> argparse.Namespace:
    """Parse and validate. `defaults` override flag defaults (as Megatron's args_defaults)."""
    parser = build_parser(extra_args_provider)
    if defaults:
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.use_checkpoint_args:
        _apply_checkpoint_args(parser, args)
    args.rank = launcher_ranks()[0]
    args.world_size = world_size if world_size is not None else world_size_from_env()
    notes, renamed = check_compat_args(parser, args)
    validate_args(parser, args, require_data=require_data)
    if notes and args.rank == 0:
        print("note: accepted for Megatron-LM compatibility, no effect here: " + "; ".join(notes), flush=True)
    if renamed and args.rank == 0:
        print("note: old Megatron-LM spellings taken as the current flags: " + "; ".join(renamed), flush=True)
    return args


def model_flag_differences(saved: argparse.Namespace, current: argparse.Namespace) -> list[str]:
    """For each model attribute of CHECKPOINT_MODEL_ARGS (file paths aside) that both Namespaces hold and
    that differs: "checkpoint has --hidden-size 64, this run asks for 128", spelled with the flags."""
    actions = {action.dest: action for action in build_parser()._actions if action.option_strings}
    differences = []
    for name in CHECKPOINT_MODEL_ARGS:
        if name in ("vocab_file", "merge_file", "tokenizer_model") or not hasattr(saved, name):
            continue
        old, new = getattr(saved, name), getattr(current, name, None)
        if old == new:
            continue
        action = actions.get(name)
        if action is None:  # derived values: padded_vocab_size, num_tokentypes
            label = name.replace("_", " ")
            differences.append(f"checkpoint has {label} {old}, this run has {new}")
        elif action.nargs == 0:  # a switch: given or not
            flag = action.option_strings[0]
            differences.append(
                f"checkpoint was saved with {flag}, this run is not"
                if old == action.const
                else f"checkpoint was saved without {flag}, this run asks for it"
            )
        else:
            flag = action.option_strings[0]
            differences.append(f"checkpoint has {flag} {old}, this run asks for {new}")
    return differences


def _apply_checkpoint_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from megatron.checkpointing import CheckpointError, load_args_from_checkpoint

    if not args.load:
        parser.error("--use-checkpoint-args needs --load DIR")
    try:
        ckpt_args = load_args_from_checkpoint(args.load)
    except CheckpointError as e:
        parser.error(f"--use-checkpoint-args: {e}")
    for name in CHECKPOINT_MODEL_ARGS:
        if hasattr(ckpt_args, name):
            setattr(args, name, getattr(ckpt_args, name))
    if args.seq_length is None:
        args.seq_length = getattr(ckpt_args, "seq_length", None)


def validate_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, require_data: bool = True
) -> None:
    """Check every cross-flag constraint, subsystem by subsystem (each check sits after its flags);
    fill derived values (data-parallel size, defaults)."""
    fail = parser.error
    _check_distributed_args(args, fail)
    _check_model_args(args, fail)
    _check_training_args(args, fail)
    _check_pipeline_args(args, fail)
    _check_learning_rate_args(args, fail)
    _check_mixed_precision_args(args, fail)
    _check_data_args(args, fail, require_data)
    _check_checkpointing_args(args, fail)


def transformer_config_from_args(
    args: argparse.Namespace, padded_vocab_size: Optional[int] = None
) -> TransformerConfig:
    """The model's typed config. `padded_vocab_size` (the run's, see megatron.run_state) defaults to
    `args.padded_vocab_size`, which the args saved in a checkpoint carry."""
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        padded_vocab_size=args.padded_vocab_size if padded_vocab_size is None else padded_vocab_size,
        max_position_embeddings=args.max_position_embeddings,
        ffn_hidden_size=args.ffn_hidden_size,
        kv_channels=args.kv_channels,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        layernorm_epsilon=args.layernorm_epsilon,
        apply_residual_connection_post_layernorm=args.apply_residual_connection_post_layernorm,
        fp32_residual_connection=args.fp32_residual_connection,
        openai_gelu=args.openai_gelu,
        bias_gelu_fusion=args.bias_gelu_fusion,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
        rotary_percent=args.rotary_percent,
        normalization=args.normalization,
        swiglu=args.swiglu,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        add_bias_linear=args.add_bias_linear,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        embedding_layernorm=args.embedding_layernorm,
        recompute_granularity=args.recompute_granularity,
        sequence_parallel=args.sequence_parallel,
        params_dtype=args.params_dtype,
    )
