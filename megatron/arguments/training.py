"""Flags of the run: batch sizes and length, learning-rate schedule, checkpointing, mixed precision,
validation and logging, each group with the check of its cross-flag constraints."""

from __future__ import annotations

import argparse
from typing import Callable, NoReturn

import torch


def add_training_args(parser: argparse.ArgumentParser) -> None:
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


def check_training_args(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> None:
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


def add_learning_rate_args(parser: argparse.ArgumentParser) -> None:
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


def check_learning_rate_args(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> None:
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


def add_checkpointing_args(parser: argparse.ArgumentParser) -> None:
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


def check_checkpointing_args(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> None:
    """Save/load flags, and the logging and evaluation intervals."""
    if args.save_interval is not None and args.save_interval <= 0:
        fail("--save-interval must be positive")
    if args.save_interval is not None and args.save is None:
        fail("--save-interval needs --save DIR")
    if args.log_interval <= 0 or args.eval_interval <= 0 or args.eval_iters < 0:
        fail("--log-interval and --eval-interval must be positive and --eval-iters non-negative")
    if args.finetune and not args.load:
        fail("--finetune needs --load DIR")


def add_mixed_precision_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mixed precision")
    g.add_argument("--fp16", action="store_true", help="fp16 model with fp32 main weights and loss scaling.")
    g.add_argument("--bf16", action="store_true", help="bf16 model with fp32 main weights and fp32 grads.")
    g.add_argument("--loss-scale", type=float, default=None, help="Static loss scale (default dynamic).")
    g.add_argument("--initial-loss-scale", type=float, default=2**32, help="Initial dynamic loss scale.")
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="Minimum dynamic loss scale.")
    g.add_argument("--loss-scale-window", type=int, default=1000, help="Clean steps before the scale grows.")
    g.add_argument("--hysteresis", type=int, default=2, help="Overflows tolerated before the scale drops.")


def check_mixed_precision_args(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> None:
    """One of fp16/bf16; the parameter dtype."""
    if args.fp16 and args.bf16:
        fail("--fp16 and --bf16 are mutually exclusive")
    if args.loss_scale is not None and not args.fp16:
        fail("--loss-scale only applies with --fp16")
    args.params_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def add_validation_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("validation")
    g.add_argument("--eval-iters", type=int, default=100, help="Iterations per evaluation.")
    g.add_argument("--eval-interval", type=int, default=1000, help="Iterations between evaluations.")
    g.add_argument("--skip-train", action="store_true", help="Only evaluate.")


def add_logging_args(parser: argparse.ArgumentParser) -> None:
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
