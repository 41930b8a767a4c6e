"""Small collectives: values over gloo ranks, and the device a backend needs (NCCL cannot reduce CPU tensors)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.parallel.collectives import all_ranks, all_reduce, any_rank, collective_device, reduce_scalars
from tests.distributed_utils import run_distributed


def _body(rank: int, world_size: int) -> None:
    assert any_rank(rank == world_size - 1) is True
    assert any_rank(False) is False
    assert all_ranks(rank != 0) is False and all_ranks(True) is True
    assert reduce_scalars([rank, 1.5], dist.group.WORLD) == [sum(range(world_size)), 1.5 * world_size]
    assert reduce_scalars([rank], dist.group.WORLD, dist.ReduceOp.MAX) == [world_size - 1]
    assert reduce_scalars([rank], None) == [rank]  # None: this rank alone
    x = torch.full((3,), float(rank))
    assert all_reduce(x, dist.group.WORLD) is x and x.tolist() == [float(sum(range(world_size)))] * 3
    pair = dist.new_group([0, 1])
    if rank < 2:
        assert any_rank(rank == 1, pair) is True and all_ranks(rank == 1, pair) is False


def test_collectives_over_three_ranks():
    run_distributed(_body, 3)


def test_single_process_needs_no_process_group():
    assert not dist.is_initialized()
    assert any_rank(True) is True and all_ranks(False) is False
    assert collective_device() == torch.device("cpu")


def test_nccl_gets_cuda_tensors_gloo_cpu(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert collective_device() == torch.device("cpu")
