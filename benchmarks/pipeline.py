"""Pipeline schedules: measured bubble against theory, and PP 2 vs PP 1 training throughput.

    python benchmarks/pipeline.py                 # bubble table (PP 2 and 4) and the throughput pair
    python benchmarks/pipeline.py --quick         # fewer microbatch counts, shorter runs

Bubble. Each stage runs megatron.schedules (1F1B, and interleaved 1F1B with v = 2) with real gloo
point-to-point transfers, on stand-in chunks whose forward takes t_f and backward 2 t_f of wall time
(time.sleep: the stage is "compute-bound" without competing for the few CPU cores, so the measurement
isolates the schedule and its transfers; a real model on 2 cores would measure the cores' contention).
On stage s, busy = m v (t_f + 2 t_f) / v summed over its chunks (v chunks of t_f / v each), idle = iteration
time - busy, and the bubble fraction is idle / busy, which the theory puts at (p - 1) / m for 1F1B and
(p - 1) / (v m) for interleaving (Narayanan et al. 2021). The table prints the worst stage.

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


class _SleepBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, backward_s: float) -> Tensor:
        ctx.backward_s = backward_s
        return x * 1.0

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        time.sleep(ctx.backward_s)
        return grad, None


class SleepChunk(nn.Module):
    """A model chunk whose forward takes `forward_s` and backward 2 x forward_s."""

    def __init__(self, forward_s: float) -> None:
        super().__init__()
        self.forward_s = forward_s
        self.weight = nn.Parameter(torch.ones(()))
        self.input_tensor = None

    def set_input_tensor(self, tensor: Tensor) -> None:
        self.input_tensor = tensor

    def forward(self, x: Tensor) -> Tensor:
        time.sleep(self.forward_s)
        source = x if self.input_tensor is None else self.input_tensor
        return _SleepBackward.apply(source * self.weight, 2 * self.forward_s)


def _forward_step(data_iterator, model):
    output = model(next(data_iterator))
    return output, lambda out: (out.sum(), {"loss": out.sum().detach()})


def _bubble_worker(rank: int, world: int, port: int, m: int, v: int, t_f: float, queue: Any) -> None:
    _init(rank, world, port)
    parallel = initialize_model_parallel(1, world)
    chunks = [SleepChunk(t_f / v) for _ in range(v)]
    config = ScheduleConfig(m, SHAPE)
    schedule = get_forward_backward_func(parallel, v)
    data = [torch.ones(SHAPE) for _ in range(m)]
    times = []
    for _ in range(3):  # the first iteration warms up gloo's connections
        dist.barrier()
        start = time.perf_counter()
        schedule(_forward_step, iter(data), chunks, config, parallel)
        times.append(time.perf_counter() - start)
    busy = m * 3 * t_f
    queue.put((rank, (min(times[1:]) - busy) / busy))
    dist.destroy_process_group()


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


def bubble_table(pps: list[int], ms: list[int], t_f: float) -> None:
    print(f"bubble fraction (idle / busy, worst stage), t_f = {t_f * 1e3:.0f} ms per microbatch and stage")
    print(f"{'PP':>3} {'m':>4} | {'1F1B':>7} {'theory':>7} | {'v=2':>7} {'theory':>7}")
    for p in pps:
        for m in ms:
            plain = max(_spawn(_bubble_worker, p, m, 1, t_f))
            inter = max(_spawn(_bubble_worker, p, m, 2, t_f)) if m % p == 0 else float("nan")
            print(f"{p:>3} {m:>4} | {plain:7.3f} {(p - 1) / m:7.3f} | {inter:7.3f} {(p - 1) / (2 * m):7.3f}")


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
    parser.add_argument("--forward-ms", type=float, default=100.0, help="t_f of a stand-in stage.")
    args = parser.parse_args()
    ms = [4, 8] if args.quick else [4, 8, 16, 32]
    bubble_table([2, 4], ms, args.forward_ms / 1e3)
    throughput((2, 4) if args.quick else (3, 13))


if __name__ == "__main__":
    main()
