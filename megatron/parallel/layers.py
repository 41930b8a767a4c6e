"""Tensor-parallel linear layers and the vocabulary-parallel embedding.

Notation: a linear layer computes Y = X A + b with X [..., in], A [in, out], b [out]. As in nn.Linear the
weight is stored transposed, W = A^T with shape [out, in]. Over a TP group of p ranks:

* ColumnParallelLinear splits A by columns, A = [A_1, ..., A_p]: rank r holds W_r = A_r^T of shape
  [out/p, in] and b_r [out/p], and computes Y_r = X A_r + b_r, its slice of the output's last dim.
  The input enters through f (identity forward, all-reduce of dX backward).
* RowParallelLinear splits A by rows, A = [A_1; ...; A_p], and takes X split by columns,
  X = [X_1, ..., X_p]: rank r holds W_r = A_r^T of shape [out, in/p] and computes X_r A_r; then
  Y = sum_r X_r A_r + b through g (all-reduce forward, identity backward). b [out] is duplicated on
  every rank and added after the all-reduce.
* VocabParallelEmbedding splits the table E [vocab, h] by rows: rank r holds E[start_r:end_r]; each rank
  looks up the ids in its range (zeros for the others) and g sums the partial results.

With sequence_parallel (Megatron's --sequence-parallel; input and output [batch, seq, ...] split over
the sequence outside the TP regions), ColumnParallelLinear takes this rank's s/p positions and all-gathers
the sequence instead of f (backward: reduce-scatter of dX), keeping only its s/p positions for the weight
gradient and all-gathering them again in backward (_GatherSequenceLinear); RowParallelLinear
reduce-scatters its output over the sequence instead of g (backward: all-gather), adding its duplicated
bias to the s/p positions it keeps; the bias gradient is then a partial sum over positions, which the
caller all-reduces over the TP group (megatron.distributed, parameters marked `sequence_parallel`).

Initialisation does not depend on p (Megatron's --use-cpu-initialization): each layer draws the FULL
master weight with torch.nn.init.normal_(master, 0, init_std) from the default torch generator and keeps
its contiguous slice; biases start at zero. Layers built in the same order after the same
torch.manual_seed therefore hold, at TP = p, exactly the slices of the TP = 1 weights.

Parameter attributes (read by grad-norm clipping and checkpoint tools): split-able parameters carry
`tensor_model_parallel = True` and `partition_dim` (the dim split over TP ranks, also at p = 1);
duplicated ones (the row-parallel bias) carry `tensor_model_parallel = False`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.parallel.cross_entropy import vocab_range_from_global_vocab_size
from megatron.parallel.mappings import (
    all_gather_sequence,
    copy_to_tensor_model_parallel_region,
    finish,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
    start_all_gather_sequence,
    start_reduce_scatter_sequence,
)
from megatron.parallel.state import ParallelState


def set_tensor_model_parallel_attributes(
    param: Tensor, is_parallel: bool, partition_dim: Optional[int]
) -> None:
    """Record on `param` whether it is split over TP ranks and along which dim (None when duplicated)."""
    param.tensor_model_parallel = is_parallel
    param.partition_dim = partition_dim


def param_is_not_tensor_parallel_duplicate(param: Tensor, parallel: ParallelState) -> bool:
    """True when `param` should be counted on this rank: it is split over TP, or this is TP rank 0.

    Parameters without the attribute (e.g. layernorm weights) are duplicated on every TP rank.
    """
    return bool(getattr(param, "tensor_model_parallel", False)) or parallel.tp_rank == 0


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size ({denominator})")
    return numerator // denominator


def _sharded_normal(
    full_shape: tuple[int, int],
    partition_dim: int,
    parallel: ParallelState,
    init_std: float,
    dtype: torch.dtype,
    stride: int = 1,
) -> nn.Parameter:
    """Draw the full fp32 master weight ~ N(0, init_std^2), keep this rank's slice along `partition_dim`.

    With `stride` k the master is k blocks stacked along `partition_dim` (SwiGLU: [gate; up], k = 2) and
    this rank keeps its r-th of p slices of EACH block, concatenated (Megatron's `stride`): the master is
    cut into k p chunks and rank r keeps chunks r, r + p, ..., r + (k - 1) p."""
    master = torch.empty(full_shape, dtype=torch.float32)
    torch.nn.init.normal_(master, mean=0.0, std=init_std)
    chunks = torch.chunk(master, stride * parallel.tp_size, dim=partition_dim)
    shard = torch.cat(chunks[parallel.tp_rank :: parallel.tp_size], dim=partition_dim)
    param = nn.Parameter(shard.to(dtype).contiguous())
    set_tensor_model_parallel_attributes(param, is_parallel=True, partition_dim=partition_dim)
    return param


class _GatherSequenceLinear(torch.autograd.Function):
    """Y = concat_s(X_r) W^T + b, keeping only this rank's shard X_r for backward (Megatron-LM's
    LinearWithGradAccumulationAndAsyncCommunication with sequence_parallel; Korthikanti et al. 2022,
    section 4.2.2).

    X_r [batch, s/p, in] is this rank's positions, X = concat_s X_r [batch, s, in] the all-gathered
    sequence, W [out/p, in] this rank's column slice. Backward, with G = dL/dY [batch, s, out/p]:

        dL/dW = G^T X      (summed over batch and positions; needs the whole X: re-all-gathered here)
        dL/db = sum over batch and positions of G
        dL/dX_r = (sum over ranks r' of G_r' W_r')[:, chunk r]   (each rank's G W is a partial sum over
                                                                   its columns: one reduce-scatter)

    So a column-parallel GEMM keeps s/p positions of its input instead of s (the paper's 2sbh/t per
    GEMM input), for one more all-gather in backward. As in Megatron-LM the collectives overlap the
    GEMMs: the re-gather runs while G W is computed, the reduce-scatter of G W while G^T X is. The
    forward and the three gradients are computed as autograd computes them for F.linear on the gathered
    input (one [batch s, in] matrix), so the results are bitwise those of gather-then-F.linear.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], group: Optional[dist.ProcessGroup]
    ) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.group, ctx.has_bias = group, bias is not None
        return F.linear(all_gather_sequence(x, group), weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], None]:
        x, weight = ctx.saved_tensors
        need_x, need_weight, need_bias, _ = ctx.needs_input_grad
        gathering = start_all_gather_sequence(x, ctx.group) if need_weight else None
        grad_2d = grad.reshape(-1, grad.size(-1))
        grad_x = grad_weight = grad_bias = scattering = None
        if need_x:  # while the re-gather runs
            grad_input = grad_2d.mm(weight).view(*grad.shape[:-1], weight.size(1))
            scattering = start_reduce_scatter_sequence(grad_input, ctx.group)
        if gathering is not None:  # while dL/dX is reduce-scattered
            whole = finish(gathering)
            grad_weight = grad_2d.t().mm(whole.reshape(-1, whole.size(-1)))
        if need_bias and ctx.has_bias:
            grad_bias = grad_2d.sum(0)
        if scattering is not None:
            grad_x = finish(scattering)
        return grad_x, grad_weight, grad_bias, None


def linear_with_sequence_gather(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], group: Optional[dist.ProcessGroup]
) -> Tensor:
    """concat_s(X_r) W^T + b for this rank's positions X_r [batch, s/p, in], keeping only X_r for backward
    (_GatherSequenceLinear); a group of one is F.linear."""
    if group is None or dist.get_world_size(group) == 1:
        return F.linear(x, weight, bias)
    return _GatherSequenceLinear.apply(x, weight, bias, group)


class ColumnParallelLinear(nn.Module):
    """Y = X A + b with A split by columns: this rank computes Y_r = X A_r + b_r (see module docstring).

    weight: [output_size / p, input_size]; bias: [output_size / p]. With gather_output the full Y is
    all-gathered onto every rank; otherwise each rank returns its slice Y_r. With skip_bias_add the bias
    is not added and is returned instead, for a later fused bias + activation. With `stride` k the output
    is k blocks (SwiGLU's [gate; up]) and this rank's rows are its slice of each block (`_sharded_normal`).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        parallel: ParallelState,
        bias: bool = True,
        gather_output: bool = False,
        init_std: float = 0.02,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype = torch.float32,
        stride: int = 1,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        if gather_output and skip_bias_add:
            raise ValueError(
                "ColumnParallelLinear: gather_output with skip_bias_add would return a split bias"
            )
        self.parallel = parallel
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = _divide(
            output_size, parallel.tp_size, "ColumnParallelLinear output_size"
        )
        self.gather_output, self.skip_bias_add = gather_output, skip_bias_add
        self.sequence_parallel = sequence_parallel and parallel.tp_size > 1
        self.weight = _sharded_normal((output_size, input_size), 0, parallel, init_std, params_dtype, stride)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition, dtype=params_dtype))
            set_tensor_model_parallel_attributes(self.bias, is_parallel=True, partition_dim=0)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """x [..., input_size] (same on all TP ranks; with sequence_parallel [batch, s/p, input_size], this
        rank's positions) -> (Y_r [..., out/p] or Y [..., out], bias or None), over the whole sequence."""
        add_bias = self.bias if not self.skip_bias_add else None
        if self.sequence_parallel:
            y = linear_with_sequence_gather(x, self.weight, add_bias, self.parallel.tp_group)
        else:
            x = copy_to_tensor_model_parallel_region(x, self.parallel.tp_group)
            y = F.linear(x, self.weight, add_bias)
        if self.gather_output:
            y = gather_from_tensor_model_parallel_region(y, self.parallel.tp_group)
        return y, (self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, out_per_partition={self.output_size_per_partition}, "
            f"bias={self.bias is not None}, gather_output={self.gather_output}"
        )


class RowParallelLinear(nn.Module):
    """Y = sum_r X_r A_r + b with A split by rows and X by columns (see module docstring).

    weight: [output_size, input_size / p]; bias: [output_size], duplicated, added after the all-reduce.
    With input_is_parallel the input is already this rank's slice X_r [..., in/p] (the output of a
    ColumnParallelLinear); otherwise the full X is split here. With skip_bias_add the bias is returned
    instead of added.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        parallel: ParallelState,
        bias: bool = True,
        input_is_parallel: bool = True,
        init_std: float = 0.02,
        skip_bias_add: bool = False,
        params_dtype: torch.dtype = torch.float32,
        sequence_parallel: bool = False,
    ) -> None:
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("RowParallelLinear: sequence_parallel needs input_is_parallel")
        self.parallel = parallel
        self.sequence_parallel = sequence_parallel and parallel.tp_size > 1
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = _divide(input_size, parallel.tp_size, "RowParallelLinear input_size")
        self.input_is_parallel, self.skip_bias_add = input_is_parallel, skip_bias_add
        self.weight = _sharded_normal((output_size, input_size), 1, parallel, init_std, params_dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=params_dtype))
            set_tensor_model_parallel_attributes(self.bias, is_parallel=False, partition_dim=None)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """x [..., in/p] (or [..., in] without input_is_parallel) -> (Y [..., out], bias or None); with
        sequence_parallel Y is [batch, s/p, out], this rank's positions."""
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.parallel.tp_group)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(F.linear(x, self.weight), self.parallel.tp_group)
        else:
            y = reduce_from_tensor_model_parallel_region(F.linear(x, self.weight), self.parallel.tp_group)
        if self.bias is None or self.skip_bias_add:
            return y, self.bias
        return y + self.bias, None

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size}, out={self.output_size}, in_per_partition={self.input_size_per_partition}, "
            f"bias={self.bias is not None}, input_is_parallel={self.input_is_parallel}"
        )


class VocabParallelEmbedding(nn.Module):
    """Embedding table [num_embeddings, embedding_dim] split by vocabulary rows over the TP group.

    weight: [num_embeddings / p, embedding_dim], rows [start_r, end_r) of the full table. forward returns
    the full lookup E[ids] on every TP rank: sum over ranks of (E_r[ids - start_r] if ids in range else 0).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        *,
        parallel: ParallelState,
        init_std: float = 0.02,
        params_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_start, self.vocab_end = vocab_range_from_global_vocab_size(
            num_embeddings, parallel.tp_rank, parallel.tp_size
        )
        self.weight = _sharded_normal((num_embeddings, embedding_dim), 0, parallel, init_std, params_dtype)

    def forward(self, input_ids: Tensor) -> Tensor:
        """input_ids [...] (global ids, same on all TP ranks) -> embeddings [..., embedding_dim]."""
        if self.parallel.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(partial, self.parallel.tp_group)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, vocab_range=[{self.vocab_start}, {self.vocab_end})"
        )
