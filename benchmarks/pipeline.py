"""Pipeline schedules: measured bubble against theory, and PP 2 vs PP 1 training throughput.

    python benchmarks/pipeline.py                 # bubble table (PP 2 and 4) and the throughput pair
    python benchmarks/pipeline.py --quick         # fewer microbatch counts, shorter runs
    python benchmarks/pipeline.py --pp 4 --microbatches 8 16 --no-throughput

Bubble. Each stage runs megatron.schedules (1F1B, and interleaved 1F1B with v = 2: the functions
training uses, with real gloo point-to-point transfers) on stand-in chunks whose forward takes t_f / v
and backward 2 t_f / v of wall time, so a stage's v chunks cost t_f + 2 t_f per microbatch as the
theory assumes (time.sleep: the stage is "compute-bound" without competing for the few CPU cores, so
the measurement isolates the schedule and its transfers; a real model on 2 cores would measure the
cores' contention). On each stage, busy = the wall time measured inside the chunks' forward and
backward sleeps, idle = iteration time (from a barrier to the stage's last backward) - busy, and the
bubble fraction is idle / busy, which the theory puts at (p - 1) / m for 1F1B and (p - 1) / (v m) for
interleaving (Narayanan et al. 2021); the theory column is that formula, nothing measured. An
iteration's bubble is its worst stage's. Of the timed iterations (after one that sets up gloo's
connections) the table prints the quietest: the one whose sleeps overshot least, a choice made without
looking at idle (on a shared machine other jobs delay wake-ups, which stretches sleeps and adds idle).
The PP 1 rows are the control: one process, no pipeline and no transfers (megatron.schedules' no-pipelining
loop; its v=2 column runs 2 m microbatches of half the cost, as many steps as a stage of v = 2), so their
idle is the per-step cost of the schedule's Python and autograd, which the theory (0) leaves out.

Choice of t_f. time.sleep overshoots by ~0.1 ms (median here; tens of ms at times when other jobs hold
the 2 cores). Busy is measured, so the overshoot counts as compute, not as bubble, and the table's last
line prints measured against nominal busy (within 1% in the runs quoted in the README). What the theory
leaves out is a fixed cost per step: the schedule's Python and autograd (the PP 1 control: ~0.4 ms per
forward or backward on the shared 2-core machine) and, on every dependency between stages that has no
slack, the hand-over to the neighbour (its post, the wake-up of the waiting process). A cost c per
forward or backward adds up to 2 v m c of idle, 2 v^2 m c / (3 (p - 1) t_f) of the theory's bubble, so
t_f must be large against c: at t_f = 100 ms the interleaved rows sit 10-90% above theory on the shared
machine, at the default t_f = 300 ms within 10% for m = 8 and 16 (README). A real stage's compute
on GPUs is of this order or longer.

Throughput. pretrain_gpt on 2 processes with mock data, the same model (8 layers, hidden 128) as
pipeline-parallel 2 (two stages) and as data-parallel 2 (PP 1), tokens per second over the timed
iterations (the difference of two run lengths, so start-up is excluded).
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from megatron.parallel.state import initialize_model_parallel
from megatron.schedules import ScheduleConfig, get_forward_backward_func

SHAPE = (1, 4, 8)  # activations exchanged between stages: tiny, the schedule's cost is what is measured


class _Clock:
    """Sleeps, and sums how long the sleeps really took (the stand-in stage's busy time)."""

    def __init__(self) -> None:
        self.busy = 0.0

    def sleep(self, seconds: float) -> None:
        start = time.perf_counter()
        time.sleep(seconds)
        self.busy += time.perf_counter() - start


class _SleepBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, backward_s: float, clock: _Clock) -> Tensor:
        ctx.backward_s, ctx.clock = backward_s, clock
        return x * 1.0

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        ctx.clock.sleep(ctx.backward_s)
        return grad, None, None


class SleepChunk(nn.Module):
    """A model chunk whose forward takes `forward_s` and backward 2 x forward_s; `clock.busy` sums the
    measured wall time of both."""

    def __init__(self, forward_s: float, clock: _Clock) -> None:
        super().__init__()
        self.forward_s, self.clock = forward_s, clock
        self.weight = nn.Parameter(torch.ones(()))
        self.input_tensor = None

    def set_input_tensor(self, tensor: Tensor) -> None:
        self.input_tensor = tensor

    def forward(self, x: Tensor) -> Tensor:
        self.clock.sleep(self.forward_s)
        source = x if self.input_tensor is None else self.input_tensor
        return _SleepBackward.apply(source * self.weight, 2 * self.forward_s, self.clock)


def _forward_step(data_iterator, model):
    output = model(next(data_iterator))
    return output, lambda out: (out.sum(), {"loss": out.sum().detach()})


def _bubble_worker(
    rank: int, world: int, port: int, m: int, v: int, t_f: float, iters: int, queue: Any
) -> None:
    """Put (rank, [(iteration time, busy) of each timed iteration]) on the queue."""
    _init(rank, world, port)
    parallel = initialize_model_parallel(1, world)
    clock = _Clock()
    chunks = [SleepChunk(t_f / v, clock) for _ in range(v)]
    config = ScheduleConfig(m, SHAPE)
    schedule = get_forward_backward_func(parallel, v)
    data = [torch.ones(SHAPE) for _ in range(m)]
    measured = []
    for _ in range(1 + iters):  # the first iteration sets up gloo's connections
        dist.barrier()
        clock.busy, start = 0.0, time.perf_counter()
        schedule(_forward_step, iter(data), chunks, config, parallel)
        measured.append((time.perf_counter() - start, clock.busy))
    queue.put((rank, measured[1:]))
    dist.destroy_process_group()


def bubble(p: int, m: int, v: int, t_f: float, iters: int) -> tuple[float, float]:
    """(bubble of the worst stage, measured / nominal busy of the stage that overshot most) in the
    quietest timed iteration: the one whose sleeps overshot least (chosen without looking at idle)."""
    iterations = list(zip(*_spawn(_bubble_worker, p, m, v, t_f, iters)))
    overshoot = [max(busy for _, busy in stages) / (m * 3 * t_f) for stages in iterations]
    quietest = min(range(iters), key=overshoot.__getitem__)
    return max((wall - busy) / busy for wall, busy in iterations[quietest]), overshoot[quietest]


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _spawn(target: Callable, world: int, *args: Any) -> list:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=target, args=(r, world, port, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in range(world))
    for p in procs:
        p.join()
    return [results[r] for r in range(world)]


def bubble_table(pps: list[int], ms: list[int], t_f: float, iters: int) -> None:
    print(
        f"bubble fraction (idle / busy, worst stage, quietest of {iters} iterations), "
        f"t_f = {t_f * 1e3:.0f} ms per microbatch and stage"
    )
    print(f"{'PP':>3} {'m':>4} | {'1F1B':>7} {'theory':>7} | {'v=2':>7} {'theory':>7}")
    ratios = []
    for p in pps:
        for m in ms:
            plain, ratio = bubble(p, m, 1, t_f, iters)
            ratios.append(ratio)
            inter = float("nan")
            if p == 1:  # the control: as many steps of t_f / 2 and 2 t_f / 2 as a stage of v = 2 runs
                inter, ratio = bubble(1, 2 * m, 1, t_f / 2, iters)
                ratios.append(ratio)
            elif m % p == 0:
                inter, ratio = bubble(p, m, 2, t_f, iters)
                ratios.append(ratio)
            print(f"{p:>3} {m:>4} | {plain:7.3f} {(p - 1) / m:7.3f} | {inter:7.3f} {(p - 1) / (2 * m):7.3f}")
    print(f"measured busy / nominal m (t_f + 2 t_f): {min(ratios):.4f} .. {max(ratios):.4f}")


def _train_worker(rank: int, world: int, port: int, argv: list[str], queue: Any) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    _init(rank, world, port)
    import pretrain_gpt

    start = time.perf_counter()
    pretrain_gpt.main(argv)
    queue.put((rank, time.perf_counter() - start))
    dist.destroy_process_group()


def throughput(iters: tuple[int, int]) -> None:
    model = (
        "--num-layers 8 --hidden-size 128 --num-attention-heads 4 --seq-length 128 --max-position-embeddings 128 "
        "--micro-batch-size 2 --global-batch-size 16 --lr 1e-4 --log-interval 1000 --eval-interval 100000 "
        "--eval-iters 0 --mock-data --tokenizer-type NullTokenizer --vocab-size 1000 --hidden-dropout 0 "
        "--attention-dropout 0"
    ).split()
    print("throughput of the same model on 2 processes (tokens/s over the timed iterations)")
    for name, grid in [("PP 1 x DP 2", ["--pipeline-model-parallel-size", "1"]),
                       ("PP 2 x DP 1", ["--pipeline-model-parallel-size", "2"])]:  # fmt: skip
        seconds = [max(_spawn(_train_worker, 2, [*model, *grid, "--train-iters", str(n)])) for n in iters]
        tokens = (iters[1] - iters[0]) * 16 * 128
        print(f"  {name}: {tokens / (seconds[1] - seconds[0]):9.0f} tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Fewer microbatch counts and iterations.")
    parser.add_argument("--forward-ms", type=float, default=300.0, help="t_f of a stand-in stage.")
    parser.add_argument("--pp", type=int, nargs="+", default=[1, 2, 4], help="Pipeline sizes (1: control).")
    parser.add_argument("--microbatches", type=int, nargs="+", help="m of the table (default 4 8 16 32).")
    parser.add_argument("--iters", type=int, default=3, help="Timed iterations per cell.")
    parser.add_argument("--no-throughput", action="store_true", help="Only the bubble table.")
    args = parser.parse_args()
    ms = args.microbatches or ([4, 8] if args.quick else [4, 8, 16, 32])
    bubble_table(args.pp, ms, args.forward_ms / 1e3, args.iters)
    if not args.no_throughput:
        throughput((2, 6) if args.quick else (3, 13))


if __name__ == "__main__":
    main()
