"""The conjugate communication functions of tensor parallelism (Megatron-LM's f and g, plus scatter/gather).

Each function is an autograd.Function whose backward is the adjoint of its forward over the TP group of
`p` ranks. With X the input on every rank, and dL/dY the gradient arriving from above:

    f = copy_to_tensor_model_parallel_region:      forward Y = X               backward dL/dX = sum_r dL/dY_r
    g = reduce_from_tensor_model_parallel_region:  forward Y = sum_r X_r       backward dL/dX_r = dL/dY
    scatter_to_tensor_model_parallel_region:       forward Y_r = X[..., chunk r]   backward dL/dX = concat_r dL/dY_r
    gather_from_tensor_model_parallel_region:      forward Y = concat_r X_r        backward dL/dX_r = (dL/dY)[..., chunk r]

(sum_r is an all-reduce, concat_r an all-gather along the last dimension, chunk r the r-th of p equal
slices of the last dimension.) f enters a TP region (before a column-parallel GEMM) and g leaves it (after
a row-parallel GEMM), so a transformer layer does one g per sub-block in forward and one f per sub-block
in backward: 2 + 2 all-reduces.

`group` None, or a group of size 1, makes every function the identity.

Counting all-reduces: inside `with count_all_reduces() as counter:` every all-reduce made by f (in
backward) and g (in forward) increments `counter.backward` or `counter.forward`; run the backward pass
inside the block to count it. Outside such a block nothing is counted, and with a group of size 1 no
all-reduce happens, so none is counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.parallel.collectives import all_reduce, group_size


@dataclass
class AllReduceCounter:
    """Number of activation all-reduces (forward) and gradient all-reduces (backward) done by f and g."""

    forward: int = 0
    backward: int = 0
    enabled: bool = False


ALLREDUCE_COUNTER = AllReduceCounter()


@contextmanager
def count_all_reduces() -> Iterator[AllReduceCounter]:
    """Reset ALLREDUCE_COUNTER, count all-reduces made by f and g inside the block, and yield the counter."""
    previously_enabled = ALLREDUCE_COUNTER.enabled
    ALLREDUCE_COUNTER.forward = ALLREDUCE_COUNTER.backward = 0
    ALLREDUCE_COUNTER.enabled = True
    try:
        yield ALLREDUCE_COUNTER
    finally:
        ALLREDUCE_COUNTER.enabled = previously_enabled


def _summed_copy(x: Tensor, group: Optional[dist.ProcessGroup], in_backward: bool) -> Tensor:
    """Sum of x over the group, in a new tensor (x itself is left untouched)."""
    if ALLREDUCE_COUNTER.enabled:
        if in_backward:
            ALLREDUCE_COUNTER.backward += 1
        else:
            ALLREDUCE_COUNTER.forward += 1
    return all_reduce(x.clone(memory_format=torch.contiguous_format), group)


def _split_last_dim(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """This rank's chunk r of p equal slices of the last dimension (contiguous)."""
    size = group_size(group)
    if size == 1:
        return x
    if x.size(-1) % size != 0:
        raise ValueError(f"last dimension {x.size(-1)} is not divisible by the tensor-parallel size {size}")
    chunk = x.size(-1) // size
    rank = dist.get_rank(group)
    return x[..., rank * chunk : (rank + 1) * chunk].contiguous()


def _gather_last_dim(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Concatenation over the group's ranks, in rank order, along the last dimension."""
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=-1)


class _CopyToRegion(torch.autograd.Function):
    """f: forward identity, backward all-reduce."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _summed_copy(grad, ctx.group, in_backward=True), None


class _ReduceFromRegion(torch.autograd.Function):
    """g: forward all-reduce, backward identity."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
        return _summed_copy(x, group, in_backward=False)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _ScatterToRegion(torch.autograd.Function):
    """Forward: keep this rank's chunk of the last dim; backward: all-gather the last dim."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
        ctx.group = group
        return _split_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _gather_last_dim(grad, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    """Forward: all-gather the last dim; backward: keep this rank's chunk of the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
        ctx.group = group
        return _gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _split_last_dim(grad, ctx.group), None


def copy_to_tensor_model_parallel_region(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """f: Y = X in forward; dL/dX = all-reduce(dL/dY) in backward."""
    if group_size(group) == 1:
        return x
    return _CopyToRegion.apply(x, group)


def reduce_from_tensor_model_parallel_region(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """g: Y = all-reduce(X) in forward; dL/dX = dL/dY in backward."""
    if group_size(group) == 1:
        return x
    return _ReduceFromRegion.apply(x, group)


def scatter_to_tensor_model_parallel_region(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Y = this rank's 1/p chunk of X's last dim in forward; dL/dX = all-gather(dL/dY) in backward."""
    if group_size(group) == 1:
        return x
    return _ScatterToRegion.apply(x, group)


def gather_from_tensor_model_parallel_region(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Y = all-gather of X along the last dim in forward; dL/dX = this rank's chunk of dL/dY in backward."""
    if group_size(group) == 1:
        return x
    return _GatherFromRegion.apply(x, group)
