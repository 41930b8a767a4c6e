"""RNG tracker (dropout identical across TP ranks outside fork(), different inside) and RNG-aware recompute."""

import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.parallel.random import (
    MODEL_PARALLEL_RNG,
    RNGStatesTracker,
    checkpoint,
    get_rng_tracker,
    model_parallel_seed,
)
from megatron.parallel.state import ParallelState, initialize_model_parallel, single_process_state
from tests.distributed_utils import run_distributed


def _gather(t: torch.Tensor, group) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return parts


class _Block(torch.nn.Module):
    """A TP MLP with dropout inside the TP region (forked RNG) and on the duplicated output (default RNG)."""

    def __init__(self, parallel: ParallelState) -> None:
        super().__init__()
        self.column = ColumnParallelLinear(8, 16, parallel=parallel)
        self.row = RowParallelLinear(16, 8, parallel=parallel)
        self.calls = 0

    def forward(self, x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        h, _ = self.column(x)
        with get_rng_tracker().fork():
            h = F.dropout(F.gelu(h), p=p)
        y, _ = self.row(h)
        return F.dropout(y, p=p), h.sum()


def _grads_with_and_without_recompute(parallel: ParallelState) -> None:
    results = []
    for use_checkpoint in (False, True):
        model_parallel_seed(123, parallel)
        block = _Block(parallel)
        x = torch.randn(4, 8, requires_grad=True)
        y, aux = checkpoint(block, x, 0.5) if use_checkpoint else block(x, 0.5)
        (y.square().sum() + aux).backward()
        next_default = torch.rand(3)
        with get_rng_tracker().fork():
            next_forked = torch.rand(3)
        assert block.calls == (2 if use_checkpoint else 1)  # the recompute ran the block again
        grads = [x.grad] + [p.grad for p in block.parameters()]
        results.append((y.detach(), grads, next_default, next_forked))
    (y0, grads0, default0, forked0), (y1, grads1, default1, forked1) = results
    assert torch.equal(y0, y1)
    assert all(torch.equal(a, b) for a, b in zip(grads0, grads1))
    assert grads0[0].abs().sum() > 0
    # The recompute left the generators where a plain run leaves them.
    assert torch.equal(default0, default1) and torch.equal(forked0, forked1)


def _check_tracker_across_tp(rank: int, world_size: int) -> None:
    parallel = initialize_model_parallel(world_size)
    model_parallel_seed(1234, parallel)
    with get_rng_tracker().fork():  # the forked stream is seeded seed + 2718 + tp_rank
        assert torch.equal(torch.rand(5), torch.rand(5, generator=_fresh(1234 + 2718 + rank)))
    outside = F.dropout(torch.ones(64), p=0.5)
    with get_rng_tracker().fork():
        inside = F.dropout(torch.ones(64), p=0.5)
    outs, ins = _gather(outside, parallel.tp_group), _gather(inside, parallel.tp_group)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert not torch.equal(ins[0], ins[1])
    # python and numpy are seeded identically on all ranks too.
    draws = _gather(
        torch.tensor([random.random(), float(np.random.rand())], dtype=torch.float64), parallel.tp_group
    )
    assert all(torch.equal(draws[0], d) for d in draws[1:])
    _grads_with_and_without_recompute(parallel)


def _fresh(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_tracker_and_recompute_tp2():
    run_distributed(_check_tracker_across_tp, world_size=2)


def test_recompute_single_process():
    _grads_with_and_without_recompute(single_process_state())


def test_fork_leaves_default_stream_alone():
    tracker = RNGStatesTracker()
    tracker.add("a", 7)
    torch.manual_seed(0)
    expected = torch.rand(6)
    torch.manual_seed(0)
    first = torch.rand(3)
    with tracker.fork("a"):
        forked = torch.rand(3)
    second = torch.rand(3)
    with tracker.fork("a"):  # the named stream continues where the previous fork left it
        forked_more = torch.rand(3)
    assert torch.equal(torch.cat([first, second]), expected)
    assert torch.equal(torch.cat([forked, forked_more]), torch.rand(6, generator=_fresh(7)))


def test_tracker_states_round_trip_and_errors():
    tracker = RNGStatesTracker()
    tracker.add("a", 7)
    saved = tracker.get_states()
    with tracker.fork("a"):
        first = torch.rand(4)
    tracker.set_states(saved)
    with tracker.fork("a"):
        again = torch.rand(4)
    assert torch.equal(first, again)
    with pytest.raises(ValueError, match="'a' already exists"):
        tracker.add("a", 8)
    with pytest.raises(ValueError, match="seed 7 is already used"):
        tracker.add("b", 7)
    with pytest.raises(KeyError, match="'missing' was not added"):
        with tracker.fork("missing"):
            pass
    tracker.reset()
    assert tracker.get_states() == {}
    tracker.add("a", 7)  # name and seed are free again after reset


def test_model_parallel_seed_names_the_stream():
    parallel = ParallelState(tp_group=None, dp_group=None, tp_rank=1, tp_size=2, dp_rank=0, dp_size=1)
    model_parallel_seed(5, parallel)
    assert list(get_rng_tracker().get_states()) == [MODEL_PARALLEL_RNG]
    with get_rng_tracker().fork():
        assert torch.equal(torch.rand(3), torch.rand(3, generator=_fresh(5 + 2718 + 1)))
    assert torch.equal(torch.rand(3), torch.rand(3, generator=_fresh(5)))


def test_checkpoint_arguments():
    calls = []

    def double(x, factor):
        calls.append(factor)
        return x * factor

    with torch.no_grad():
        assert torch.equal(checkpoint(double, torch.ones(2), 3.0), torch.full((2,), 3.0))
    with pytest.raises(ValueError, match="no tensor argument requires grad"):
        checkpoint(double, torch.ones(2), 3.0)
    x = torch.ones(2, requires_grad=True)
    checkpoint(double, x, 4.0).sum().backward()
    assert torch.equal(x.grad, torch.full((2,), 4.0)) and calls == [3.0, 4.0, 4.0]
