"""Training log lines in Megatron-LM's format, and TensorBoard / Weights & Biases scalars.

The line format is what existing log parsers expect:

     iteration       10/     100 | consumed samples:          320 | elapsed time per iteration (ms): 123.4 |
     throughput per GPU (TFLOP/s/GPU): 1.2 | learning rate: 1.000000E-04 | global batch size:    32 |
     lm loss: 7.123456E+00 | loss scale: 1.0 | grad norm: 1.234 | number of skipped iterations:   0 |
     number of nan iterations:   0 |
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable, Optional

import torch


def format_train_line(
    iteration: int,
    train_iters: int,
    consumed_samples: int,
    elapsed_ms: float,
    tflops_per_gpu: float,
    learning_rate: float,
    global_batch_size: int,
    losses: dict[str, float],
    loss_scale: float,
    grad_norm: Optional[float],
    skipped: int,
    nans: int,
) -> str:
    """One training log line, spelled as Megatron-LM spells it."""
    line = f" iteration {iteration:8d}/{train_iters:8d} |"
    line += f" consumed samples: {consumed_samples:12d} |"
    line += f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
    # Megatron prints one decimal; below 1 TFLOP/s (a CPU) three keep the number informative.
    line += f" throughput per GPU (TFLOP/s/GPU): {tflops_per_gpu:.{1 if tflops_per_gpu >= 1 else 3}f} |"
    line += f" learning rate: {learning_rate:.6E} |"
    line += f" global batch size: {global_batch_size:5d} |"
    for name, value in losses.items():
        line += f" {name}: {value:.6E} |"
    line += f" loss scale: {loss_scale:.1f} |"
    if grad_norm is not None:
        line += f" grad norm: {grad_norm:.3f} |"
    line += f" number of skipped iterations: {skipped:3d} |"
    line += f" number of nan iterations: {nans:3d} |"
    return line


def format_eval_block(prefix: str, losses: dict[str, float]) -> str:
    """Megatron's validation block: loss value and perplexity (exp of the loss, capped at exp(20))."""
    body = f" {prefix} |"
    for name, value in losses.items():
        body += f" {name} value: {value:.6E} | {name} PPL: {math.exp(min(20.0, value)):.6E} |"
    rule = "-" * (len(body) + 1)
    return f"{rule}\n{body}\n{rule}"


class ScalarWriter:
    """TensorBoard (and optionally wandb) scalars, written by the last rank only."""

    def __init__(self, args: argparse.Namespace, is_last_rank: bool) -> None:
        self.tensorboard = None
        self.wandb = None
        if not is_last_rank:
            return
        if args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=1000)
        if args.wandb_project:
            try:
                import wandb
            except ImportError:
                print("warning: --wandb-project given but wandb is not installed; skipping wandb", flush=True)
            else:
                self.wandb = wandb.init(
                    project=args.wandb_project, name=args.wandb_exp_name, config=vars(args)
                )

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


class IntervalLogger:
    """Accumulates the iterations between two log lines; prints Megatron's line every --log-interval
    iterations and writes TensorBoard scalars every --tensorboard-log-interval iterations."""

    def __init__(
        self,
        args: argparse.Namespace,
        train_iters: int,
        writer: ScalarWriter,
        print_fn: Callable[[str], None],
    ) -> None:
        self.args = args
        self.train_iters = train_iters
        self.writer = writer
        self.print = print_fn
        self.tty = sys.stdout.isatty()
        self.skipped = 0
        self.nans = 0
        self.consecutive_bad = 0  # iterations in a row with a NaN/inf loss or gradient
        self._reset()

    def _reset(self) -> None:
        self.losses: dict[str, float] = {}
        self.count = 0
        self.flops = 0.0
        self.start = time.time()

    def record(
        self,
        iteration: int,
        consumed_samples: int,
        losses: dict[str, float],
        update_successful: bool,
        grad_norm: Optional[float],
        global_batch: int,
        learning_rate: float,
        loss_scale: float,
        flops: float,
    ) -> None:
        """Account for one finished iteration; log when an interval is complete."""
        args = self.args
        loss_is_bad = not all(math.isfinite(v) for v in losses.values())
        self.skipped += 0 if update_successful else 1
        self.nans += int(loss_is_bad)
        # fp16 skips steps on overflow by design; otherwise a skipped step means NaN/inf gradients.
        bad = loss_is_bad or not (update_successful or args.fp16)
        self.consecutive_bad = self.consecutive_bad + 1 if bad else 0
        for name, value in losses.items():
            if math.isfinite(value):
                self.losses[name] = self.losses.get(name, 0.0) + value
        self.count += 1
        self.flops += flops
        if iteration % args.tensorboard_log_interval == 0:
            scalars = dict(losses, **{"learning-rate": learning_rate, "loss-scale": loss_scale})
            scalars["batch-size"] = global_batch
            if grad_norm is not None:
                scalars["grad-norm"] = grad_norm
            self.writer.add_scalars(scalars, iteration)
        if iteration % args.log_interval != 0:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.time() - self.start
        per_iter = elapsed / self.count
        tflops = self.flops / elapsed / args.world_size / 1e12
        average = {name: total / self.count for name, total in self.losses.items()}
        line = format_train_line(
            iteration, self.train_iters, consumed_samples, per_iter * 1000.0, tflops, learning_rate,
            global_batch, average, loss_scale, grad_norm, self.skipped, self.nans,
        )  # fmt: skip
        self.print(line)
        perf = {"throughput-tflops-per-gpu": tflops, "iteration-time-ms": per_iter * 1000.0}
        if torch.cuda.is_available():
            perf["mem-max-allocated-gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.writer.add_scalars(perf, iteration)
        if self.tty:
            eta = time.strftime("%H:%M:%S", time.gmtime(per_iter * (self.train_iters - iteration)))
            self.print(f"   [{iteration}/{self.train_iters}] eta {eta}")
        self._reset()
