"""Cross entropy over logits split along the vocabulary, without ever gathering the full logits.

Rank r of the TP group holds the logits z[..., v] for v in its vocabulary range [start_r, end_r). The
per-token loss with target t is

    loss = log(sum_v exp(z_v - m)) - (z_t - m),         m = max_v z_v

computed with three all-reduces over the group of scalars per token: the global max m (MAX), the shifted
target logit z_t - m (SUM; only the rank whose range holds t contributes a non-zero), and the partition
function sum_v exp(z_v - m) (SUM). The gradient with respect to this rank's logits is

    dloss/dz_v = softmax(z)_v - [v == t]                for v in [start_r, end_r)

which every rank computes from its own shard. All maths is fp32; the gradient is returned in the logits'
dtype.
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
    def forward(ctx, logits: Tensor, target: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
        size = group_size(group)
        rank = dist.get_rank(group) if size > 1 else 0
        start, end = vocab_range_from_global_vocab_size(logits.size(-1) * size, rank, size)

        # Shift by the global max for a stable exp; `shifted` is a fresh fp32 tensor we may modify.
        logits_max = logits.float().amax(dim=-1)
        all_reduce(logits_max, group, dist.ReduceOp.MAX)
        shifted = logits.float() - logits_max.unsqueeze(-1)

        # Target logit: read locally where the target lies in our range, 0 elsewhere, then summed over ranks.
        not_local = (target < start) | (target >= end)
        local_target = (target - start).masked_fill(not_local, 0)
        target_logit = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(not_local, 0.0)
        all_reduce(target_logit, group, dist.ReduceOp.SUM)

        exp_logits = shifted.exp_()
        sum_exp = exp_logits.sum(dim=-1)
        all_reduce(sum_exp, group, dist.ReduceOp.SUM)
        loss = torch.log(sum_exp) - target_logit

        softmax = exp_logits.div_(sum_exp.unsqueeze(-1))
        ctx.logits_dtype = logits.dtype
        ctx.save_for_backward(softmax, local_target, not_local)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None, None]:
        softmax, local_target, not_local = ctx.saved_tensors
        is_target = (~not_local).to(softmax.dtype).unsqueeze(-1)
        # softmax - onehot(target), in place (saves a copy of the logits' size): the saved softmax is our own
        # buffer; a second backward (retain_graph) fails on its bumped version instead of reading it.
        grad = softmax.scatter_add_(-1, local_target.unsqueeze(-1), -is_target)
        grad.mul_(grad_loss.float().unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None


def vocab_parallel_cross_entropy(
    vocab_parallel_logits: Tensor, target: Tensor, group: Optional[dist.ProcessGroup]
) -> Tensor:
    """Per-token cross entropy of logits [..., V/p] split over the vocabulary; returns fp32 [...].

    Equal in value and gradient to F.cross_entropy(full_logits, target, reduction='none') where
    full_logits is the concatenation of the shards in rank order. `target` holds global vocabulary ids.
    """
    return _VocabParallelCrossEntropy.apply(vocab_parallel_logits, target, group)
