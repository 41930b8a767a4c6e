"""Cross entropy over logits split along the vocabulary, without ever gathering the full logits.

Rank r of the TP group holds the logits z[..., v] for v in its vocabulary range [start_r, end_r). The
per-token loss with target t is

    loss = log(sum_v exp(z_v - m)) - (z_t - m),         m = max_v z_v

computed with three all-reduces over the group of scalars per token: the global max m (MAX), the shifted
target logit z_t - m (SUM; only the rank whose range holds t contributes a non-zero), and the partition
function sum_v exp(z_v - m) (SUM). The gradient with respect to this rank's logits is

    dloss/dz_v = softmax(z)_v - [v == t]                for v in [start_r, end_r)

which every rank computes from its own shard, in place in the buffer of exp(z_v - m) that the forward kept
(the softmax's 1 / sum_v exp(z_v - m) is folded into the scaling by the incoming gradient). All maths is
fp32; the gradient is returned in the logits' dtype. With one rank the all-reduces vanish, the maths stays.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.parallel.collectives import all_reduce, group_size


def vocab_range_from_global_vocab_size(global_vocab_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the vocabulary ids held by `rank` of `world_size`: contiguous equal slices."""
    if global_vocab_size % world_size != 0:
        raise ValueError(
            f"vocabulary size {global_vocab_size} is not divisible by the tensor-parallel size {world_size}"
        )
    per_partition = global_vocab_size // world_size
    return rank * per_partition, (rank + 1) * per_partition


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits: Tensor, target: Tensor, group: Optional[dist.ProcessGroup], overwrite_logits: bool
    ) -> Tensor:
        size = group_size(group)
        rank = dist.get_rank(group) if size > 1 else 0
        start, end = vocab_range_from_global_vocab_size(logits.size(-1) * size, rank, size)

        # One fp32 buffer of the logits' size holds z - m, then exp(z - m), then (backward) the gradient:
        # the logits themselves when the caller hands them over, else a copy.
        shifted = logits.to(torch.float32, copy=not overwrite_logits)
        logits_max = all_reduce(shifted.amax(dim=-1, keepdim=True), group, dist.ReduceOp.MAX)
        shifted.sub_(logits_max)

        # Target logit: read locally where the target lies in our range, 0 elsewhere, then summed over ranks.
        not_local = (target < start) | (target >= end)
        local_target = (target - start).masked_fill(not_local, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(not_local, 0.0)
        all_reduce(target_logit, group, dist.ReduceOp.SUM)

        exp_logits = shifted.exp_()
        sum_exp = all_reduce(exp_logits.sum(dim=-1), group, dist.ReduceOp.SUM)
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(exp_logits, sum_exp, local_target, not_local)
        return torch.log(sum_exp) - target_logit

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None, None, None]:
        exp_logits, sum_exp, local_target, not_local = ctx.saved_tensors
        grad_loss = grad_loss.float()
        # g (softmax - onehot) = exp(z - m) (g / sum_exp) - g [v == t], in place in the saved buffer (no copy
        # of the logits' size); a second backward (retain_graph) fails on its bumped version instead.
        grad = exp_logits.mul_((grad_loss / sum_exp).unsqueeze(-1))
        grad.scatter_add_(
            -1, local_target.unsqueeze(-1), grad_loss.masked_fill(not_local, 0.0).neg().unsqueeze(-1)
        )
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(
    vocab_parallel_logits: Tensor,
    target: Tensor,
    group: Optional[dist.ProcessGroup],
    *,
    overwrite_logits: bool = False,
) -> Tensor:
    """Per-token cross entropy of logits [..., V/p] split over the vocabulary; returns fp32 [...].

    Equal in value and gradient to F.cross_entropy(full_logits, target, reduction='none') where
    full_logits is the concatenation of the shards in rank order. `target` holds global vocabulary ids.
    With `overwrite_logits` (fp32 logits that nothing else reads afterwards, as Megatron-LM's in-place
    version assumes) the logits' own storage is the work buffer: it saves a fresh copy of the logits' size.
    Their contents are then undefined after the call, and an autograd node that saved them fails loudly.
    """
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, group, overwrite_logits)
