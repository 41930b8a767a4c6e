"""Training log lines in Megatron-LM's format, and TensorBoard / Weights & Biases scalars.

The line format is what existing log parsers expect:

     iteration       10/     100 | consumed samples:          320 | elapsed time per iteration (ms): 123.4 |
     throughput per GPU (TFLOP/s/GPU): 1.2 | learning rate: 1.000000E-04 | global batch size:    32 |
     lm loss: 7.123456E+00 | loss scale: 1.0 | grad norm: 1.234 | number of skipped iterations:   0 |
     number of nan iterations:   0 |

with " num zeros: 12.0 |" and " params norm: 123.456 |" after the grad norm under --log-num-zeros-in-grad
and --log-params-norm.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
    num_zeros: Optional[float] = None,
    params_norm: Optional[float] = None,
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
    if num_zeros is not None:
        line += f" num zeros: {num_zeros:.1f} |"
    if params_norm is not None:
        line += f" params norm: {params_norm:.3f} |"
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


@dataclass
class StepStats:
    """What one training iteration reports to the log (num_zeros / params_norm: None unless asked for)."""

    losses: dict[str, float]
    update_successful: bool
    grad_norm: Optional[float]
    global_batch: int
    learning_rate: float
    loss_scale: float
    flops: float
    num_zeros: Optional[float] = None
    params_norm: Optional[float] = None


class StepTimers:
    """Wall time of the phases of a training step (--log-timers-to-tensorboard), synchronising CUDA at each
    phase boundary so that the time is the work's, not its launch's. Only built when that flag is given."""

    def __init__(self) -> None:
        self.elapsed: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        _synchronize()
        start = time.perf_counter()
        yield
        _synchronize()
        self.elapsed[name] = self.elapsed.get(name, 0.0) + time.perf_counter() - start

    def pop(self, iterations: int) -> dict[str, float]:
        """Seconds per iteration of each phase since the last pop, as Megatron names them ("<phase>-time")."""
        values = {f"{name}-time": total / iterations for name, total in self.elapsed.items()}
        self.elapsed = {}
        return values


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def memory_scalars() -> dict[str, float]:
    """--log-memory-to-tensorboard: the CUDA caching allocator's statistics, as Megatron writes them; on a
    machine without CUDA the process's peak resident memory (Linux ru_maxrss is in KiB)."""
    if torch.cuda.is_available():
        stats = torch.cuda.memory_stats()
        return {
            "mem-reserved-bytes": stats["reserved_bytes.all.current"],
            "mem-allocated-bytes": stats["allocated_bytes.all.current"],
            "mem-allocated-count": stats["allocation.all.current"],
        }
    return {"mem-max-rss-bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0}


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
        self.timers = StepTimers() if args.log_timers_to_tensorboard else None
        self.skipped = 0  # over the whole run (the summary); the log line counts per interval, as Megatron
        self.consecutive_bad = 0  # iterations in a row with a NaN/inf loss or gradient
        self._since_tensorboard = 0
        self._reset()

    def _reset(self) -> None:
        self.losses: dict[str, float] = {}
        self.count = 0
        self.interval_skipped = 0
        self.interval_nans = 0
        self.flops = 0.0
        self.start = time.time()

    def record(self, iteration: int, consumed_samples: int, step: StepStats) -> None:
        """Account for one finished iteration; log when an interval is complete."""
        args = self.args
        loss_is_bad = not all(math.isfinite(v) for v in step.losses.values())
        self.skipped += 0 if step.update_successful else 1
        self.interval_skipped += 0 if step.update_successful else 1
        self.interval_nans += int(loss_is_bad)
        # fp16 skips steps on overflow by design; otherwise a skipped step means NaN/inf gradients.
        bad = loss_is_bad or not (step.update_successful or args.fp16)
        self.consecutive_bad = self.consecutive_bad + 1 if bad else 0
        for name, value in step.losses.items():
            if math.isfinite(value):
                self.losses[name] = self.losses.get(name, 0.0) + value
        self.count += 1
        self.flops += step.flops
        self._since_tensorboard += 1
        if iteration % args.tensorboard_log_interval == 0:
            self._write_scalars(iteration, step)
        if iteration % args.log_interval == 0:
            self._print_line(iteration, consumed_samples, step)

    def _write_scalars(self, iteration: int, step: StepStats) -> None:
        scalars = dict(step.losses, **{"learning-rate": step.learning_rate, "loss-scale": step.loss_scale})
        scalars["batch-size"] = step.global_batch
        optional = {"grad-norm": step.grad_norm, "num-zeros": step.num_zeros, "params-norm": step.params_norm}
        scalars.update({name: value for name, value in optional.items() if value is not None})
        if self.timers is not None:
            scalars.update(self.timers.pop(self._since_tensorboard))
        if self.args.log_memory_to_tensorboard:
            scalars.update(memory_scalars())
        self._since_tensorboard = 0
        self.writer.add_scalars(scalars, iteration)

    def _print_line(self, iteration: int, consumed_samples: int, step: StepStats) -> None:
        _synchronize()
        elapsed = time.time() - self.start
        per_iter = elapsed / self.count
        tflops = self.flops / elapsed / self.args.world_size / 1e12
        average = {name: total / self.count for name, total in self.losses.items()}
        line = format_train_line(
            iteration, self.train_iters, consumed_samples, per_iter * 1000.0, tflops, step.learning_rate,
            step.global_batch, average, step.loss_scale, step.grad_norm, self.interval_skipped, self.interval_nans,
            num_zeros=step.num_zeros, params_norm=step.params_norm,
        )  # fmt: skip
        self.print(line)
        perf = {"throughput-tflops-per-gpu": tflops, "iteration-time-ms": per_iter * 1000.0}
        if self.args.log_timers_to_tensorboard:
            perf["iteration-time"] = per_iter  # Megatron's name, in seconds
        if torch.cuda.is_available():
            perf["mem-max-allocated-gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.writer.add_scalars(perf, iteration)
        if self.tty:
            eta = time.strftime("%H:%M:%S", time.gmtime(per_iter * (self.train_iters - iteration)))
            self.print(f"   [{iteration}/{self.train_iters}] eta {eta}")
        self._reset()
