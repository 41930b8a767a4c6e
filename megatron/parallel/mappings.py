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

Sequence parallelism (Korthikanti et al. 2022) splits the sequence dimension (dim 1 of our [batch, seq,
hidden] activations) over the same group, outside the TP regions: rank r holds X_r = X[:, chunk r] (s/p
positions). With "concat_s" an all-gather and "scatter_s" a reduce-scatter along the sequence:

    scatter_to_sequence_parallel_region:     forward Y_r = X[:, chunk r]          backward dL/dX = concat_s dL/dY_r
    gather_from_sequence_parallel_region:    forward Y = concat_s X_r
        grad_is_partial=True  (consumer is TP-split, e.g. a column-parallel GEMM):
                                             backward dL/dX_r = (sum_r' dL/dY_r')[:, chunk r]   (reduce-scatter)
        grad_is_partial=False (consumer is duplicated on every rank):
                                             backward dL/dX_r = (dL/dY)[:, chunk r]
    reduce_scatter_to_sequence_parallel_region:
                                             forward Y_r = (sum_r' X_r')[:, chunk r]  backward dL/dX_r = concat_s dL/dY

The all-gather replaces f before a column-parallel GEMM and the reduce-scatter replaces g after a
row-parallel GEMM: a layer makes 2 all-gathers + 2 reduce-scatters in forward and, as their adjoints,
2 reduce-scatters + 2 all-gathers in backward, and no all-reduce (an all-reduce is a reduce-scatter
followed by an all-gather, so the traffic is the same). The column-parallel GEMMs do not keep their
all-gathered input for the weight gradient: they fuse the all-gather with the GEMM and all-gather this
rank's shard again in backward (megatron.parallel.layers), 2 more all-gathers per layer in backward.

`group` None, or a group of size 1, makes every function the identity.

As in Megatron-LM, the all-reduces work in place, without a copy of the activation: g sums its input
tensor itself (pass a tensor nothing else reads, such as a GEMM's output; autograd is told it was
modified), and f's backward sums the incoming gradient. Tests count collectives by patching
torch.distributed (tests/collectives.py), so nothing here is instrumented.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.parallel.collectives import all_gather_into, all_reduce, group_size, reduce_scatter_into


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


Collective = Callable[[Tensor, Optional[dist.ProcessGroup]], Tensor]
SEQUENCE_DIM = 1  # activations are [batch, seq, hidden]


def _split_sequence(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """This rank's chunk r of p equal slices of the sequence dimension (contiguous)."""
    size = group_size(group)
    if x.size(SEQUENCE_DIM) % size != 0:
        raise ValueError(
            f"sequence length {x.size(SEQUENCE_DIM)} is not divisible by the tensor-parallel size {size} "
            "(--sequence-parallel splits the sequence over the tensor-parallel ranks)"
        )
    return x.chunk(size, dim=SEQUENCE_DIM)[dist.get_rank(group)].contiguous()


class Pending(NamedTuple):
    """A started asynchronous collective: `result` is valid once `work.wait()` has returned (work None: a
    group of one, ready at once); `source`, the buffer being sent, is kept alive until then."""

    result: Tensor
    work: Optional[dist.Work]
    source: Tensor


def finish(pending: Pending) -> Tensor:
    """The result of a started collective, after waiting for it."""
    if pending.work is not None:
        pending.work.wait()
    return pending.result


def start_all_gather_sequence(x: Tensor, group: Optional[dist.ProcessGroup]) -> Pending:
    """Start concat over the group's ranks, in rank order, along the sequence dimension (one all-gather)."""
    size = group_size(group)
    local = x.transpose(0, SEQUENCE_DIM).contiguous()  # the sequence first: ranks' parts are contiguous
    whole = torch.empty((size * local.size(0), *local.shape[1:]), dtype=x.dtype, device=x.device)
    work = all_gather_into(whole, local, group, async_op=True)
    return Pending(whole.transpose(0, SEQUENCE_DIM), work, local)


def all_gather_sequence(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """concat over the group's ranks, in rank order, along the sequence dimension (one all-gather)."""
    return finish(start_all_gather_sequence(x, group))


def start_reduce_scatter_sequence(x: Tensor, group: Optional[dist.ProcessGroup]) -> Pending:
    """Start (sum over the group of x)[:, chunk r]: one reduce-scatter along the sequence dimension."""
    size = group_size(group)
    if x.size(SEQUENCE_DIM) % size != 0:
        raise ValueError(
            f"sequence length {x.size(SEQUENCE_DIM)} is not divisible by the tensor-parallel size {size}"
        )
    whole = x.transpose(0, SEQUENCE_DIM).contiguous()
    local = torch.empty((whole.size(0) // size, *whole.shape[1:]), dtype=x.dtype, device=x.device)
    work = reduce_scatter_into(local, whole, group, async_op=True)
    return Pending(local.transpose(0, SEQUENCE_DIM), work, whole)


def reduce_scatter_sequence(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """(sum over the group of x)[:, chunk r]: one reduce-scatter along the sequence dimension."""
    return finish(start_reduce_scatter_sequence(x, group))


class _CopyToRegion(torch.autograd.Function):
    """f: forward identity, backward all-reduce."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return all_reduce(grad.contiguous(), ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    """g: forward all-reduce, backward identity."""

    @staticmethod
    def forward(ctx, x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
        if not x.is_contiguous():
            return all_reduce(x.contiguous(), group)
        ctx.mark_dirty(x)
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class _Adjoint(torch.autograd.Function):
    """Y = forward_op(X, group) in forward; dL/dX = backward_op(dL/dY, group), its adjoint, in backward.
    The scatter / gather / reduce-scatter pairs of the module docstring are all of this form."""

    @staticmethod
    def forward(
        ctx, x: Tensor, group: Optional[dist.ProcessGroup], forward_op: Collective, backward_op: Collective
    ) -> Tensor:
        ctx.group, ctx.backward_op = group, backward_op
        return forward_op(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return ctx.backward_op(grad, ctx.group), None, None, None


def _adjoint(
    x: Tensor, group: Optional[dist.ProcessGroup], forward_op: Collective, backward_op: Collective
) -> Tensor:
    """_Adjoint, or the identity over a group of one."""
    if group_size(group) == 1:
        return x
    return _Adjoint.apply(x, group, forward_op, backward_op)


def copy_to_tensor_model_parallel_region(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """f: Y = X in forward; dL/dX = all-reduce(dL/dY) in backward."""
    if group_size(group) == 1:
        return x
    return _CopyToRegion.apply(x, group)


def reduce_from_tensor_model_parallel_region(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """g: Y = all-reduce(X) in forward (X itself is overwritten when contiguous); dL/dX = dL/dY in backward."""
    if group_size(group) == 1:
        return x
    return _ReduceFromRegion.apply(x, group)


def scatter_to_tensor_model_parallel_region(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Y = this rank's 1/p chunk of X's last dim in forward; dL/dX = all-gather(dL/dY) in backward."""
    return _adjoint(x, group, _split_last_dim, _gather_last_dim)


def gather_from_tensor_model_parallel_region(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Y = all-gather of X along the last dim in forward; dL/dX = this rank's chunk of dL/dY in backward."""
    return _adjoint(x, group, _gather_last_dim, _split_last_dim)


def scatter_to_sequence_parallel_region(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Y_r = X[:, chunk r] in forward; dL/dX = all-gather over the sequence of dL/dY_r in backward."""
    return _adjoint(x, group, _split_sequence, all_gather_sequence)


def gather_from_sequence_parallel_region(
    x: Tensor, group: Optional[dist.ProcessGroup], grad_is_partial: bool = True
) -> Tensor:
    """Y = all-gather over the sequence of X_r in forward; in backward the reduce-scatter of dL/dY when
    each rank's dL/dY is a partial sum (grad_is_partial: the consumer is TP-split), else its chunk r."""
    return _adjoint(
        x, group, all_gather_sequence, reduce_scatter_sequence if grad_is_partial else _split_sequence
    )


def reduce_scatter_to_sequence_parallel_region(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Y_r = (sum over ranks of X)[:, chunk r] in forward; dL/dX = all-gather of dL/dY_r in backward."""
    return _adjoint(x, group, reduce_scatter_sequence, all_gather_sequence)
