"""Small collectives on host values, and the one in-place all-reduce every module calls.

`all_reduce(x, group, op)`: x <- op_r x_r over the ranks r of `group`, in place (x is returned). A group
of None (this rank alone; see ParallelState) or of size 1 leaves x unchanged and communicates nothing.

`reduce_scalars(values, group, op)`: the same for a few Python numbers (flags, counters, norms): they are
packed into one float64 tensor on the device the group's backend communicates on (the current CUDA
device under NCCL, which cannot reduce CPU tensors; the CPU under gloo), reduced, and read back.
`any_rank(flag)` is `reduce_scalars([flag], world, MAX) > 0`: true on every rank when it is true on any
rank, so that all ranks take the same branch (stop, skip, save); `all_ranks` is the same with MIN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """Number of ranks in `group`; 1 for None (no communication)."""
    return 1 if group is None else dist.get_world_size(group)


def world_group() -> Optional[dist.ProcessGroup]:
    """The group of all ranks, or None when torch.distributed is not initialised (a single process)."""
    return dist.group.WORLD if dist.is_initialized() else None


def collective_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """Where a tensor must live for `group`'s backend: the current CUDA device for NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(
    x: Tensor, group: Optional[dist.ProcessGroup], op: dist.ReduceOp = dist.ReduceOp.SUM
) -> Tensor:
    """In place: x <- op over the ranks of `group` of their x (SUM by default); returns x."""
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def reduce_scalars(
    values: Sequence[float], group: Optional[dist.ProcessGroup], op: dist.ReduceOp = dist.ReduceOp.SUM
) -> list[float]:
    """op over the ranks of `group` of each of `values` (one collective for all of them)."""
    if group_size(group) == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=collective_device(group))
    dist.all_reduce(t, op=op, group=group)
    return t.tolist()


def any_rank(flag: bool, group: Optional[dist.ProcessGroup] = None) -> bool:
    """True on every rank of `group` (default: all ranks) when `flag` is true on any of them."""
    group = world_group() if group is None else group
    return reduce_scalars([1.0 if flag else 0.0], group, dist.ReduceOp.MAX)[0] > 0.0


def all_ranks(flag: bool, group: Optional[dist.ProcessGroup] = None) -> bool:
    """True on every rank of `group` (default: all ranks) when `flag` is true on all of them."""
    group = world_group() if group is None else group
    return reduce_scalars([1.0 if flag else 0.0], group, dist.ReduceOp.MIN)[0] > 0.0
