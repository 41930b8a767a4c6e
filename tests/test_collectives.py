"""The collective recorder of tests/collectives.py sees every kind of torch.distributed call, with its group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.collectives import record_collectives
from tests.distributed_utils import run_distributed


def _every_kind(rank: int, world_size: int) -> None:
    pair = dist.new_group([0, 1])
    x = torch.ones(4)
    with record_collectives() as calls:
        dist.all_reduce(x, group=pair)
        dist.all_gather([torch.empty(4) for _ in range(2)], x, group=pair)
        dist.all_gather_into_tensor(torch.empty(8), x, group=pair)
        dist.reduce_scatter_tensor(torch.empty(2), x, group=pair)
        dist.broadcast(x, src=0)
        dist.all_to_all_single(torch.empty(4), x)
        dist.all_gather_object([None, None], {"rank": rank})  # runs all_gather inside: recorded once
        ops = [dist.P2POp(dist.isend, x, 1 - rank), dist.P2POp(dist.irecv, torch.empty(4), 1 - rank)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        if rank == 0:
            dist.send(x, 1)
        else:
            dist.recv(x, 0)
        dist.barrier()
    names = [c.name for c in calls]
    expected = ["all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast"]
    expected += [
        "all_to_all_single",
        "all_gather_object",
        "batch_isend_irecv",
        "send" if rank == 0 else "recv",
    ]
    assert names == expected + ["barrier"], names
    assert all(c.ranks == (0, 1) for c in calls)
    assert calls[0].numel == 4 and calls[2].numel == 12
    assert len(calls.matching("all_reduce", ranks=(0, 1))) == 1 and not calls.matching(
        "all_reduce", ranks=(0,)
    )
    # Outside the block nothing is recorded and the originals are back.
    dist.all_reduce(x)
    assert len(calls) == len(expected) + 1


def test_collectives_recorder_sees_everything() -> None:
    run_distributed(_every_kind, 2)
