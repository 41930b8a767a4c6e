"""Global gradient norm over the model-parallel (TP x PP) group, inf/nan detection, and clipping by it.

The model's parameters are split over the TP group (a TP-split weight W is stored as shards W_0..W_{t-1},
one per TP rank, while small parameters such as layernorms and row-parallel biases are duplicated on every
rank) and over the pipeline stages (each stage holds its own layers; the last stage also holds a copy of
the tied word embedding, marked `shared`). The global L2 norm of the gradient of the whole model is

    ||g|| = sqrt( sum over ranks r of the TP x PP group of  sum over params p of r counted in the norm of ||g_p||^2 )

where a TP-duplicated parameter is counted on TP rank 0 only and the shared embedding copy not at all.
Each rank computes its partial sum of squares from per-tensor norms (torch._foreach_norm, one pass over
the gradients) and one all-reduce (SUM) over the model-parallel group completes it. The same all-reduce
carries the number of gradients with an inf/nan element (a non-finite per-tensor norm), counted over
every parameter including duplicates, so all TP ranks and pipeline stages agree on whether to skip the
step. Without the distributed optimizer the DP group needs no reduction: after the data-parallel
all-reduce every DP rank holds bitwise identical gradients, hence identical norms and the same overflow
decision. With it (`sharded_over_dp`) each DP rank holds a disjoint shard of the gradient, so the same
sums are also all-reduced over the DP group. `norm_reduction_groups` is the one place that lists the
groups a gradient is split over.

Clipping (Megatron's rule): with coeff = max_norm / (||g|| + 1e-6), if coeff < 1 every gradient is
multiplied by coeff, so the clipped norm is max_norm (up to the 1e-6).

For the log line (--log-num-zeros-in-grad, --log-params-norm) the same counting rule gives the number of
zero gradient elements, sum over TP ranks r of sum over counted p of #{i : g_p[i] = 0}, and the parameter
norm sqrt(sum_r sum_p ||w_p||^2), each completed by one all-reduce (SUM) over the model-parallel (TP x PP) group.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.parallel.collectives import all_reduce
from megatron.parallel.state import ParallelState


def model_parallel_group(parallel: ParallelState) -> Optional[dist.ProcessGroup]:
    """The ranks holding one model replica (TP x PP); a ParallelState built by hand without that group
    (no pipeline) reduces over TP."""
    return parallel.mp_group if parallel.mp_group is not None else parallel.tp_group


def norm_reduction_groups(parallel: ParallelState, sharded_over_dp: bool) -> list[dist.ProcessGroup]:
    """The process groups over which the partial sums of a gradient norm must be added: the model-parallel
    (TP x PP) group, plus the DP group when the optimizer shards the gradient over it (groups of size 1
    omitted)."""
    groups = [model_parallel_group(parallel)]
    if sharded_over_dp:
        groups.append(parallel.dp_group)
    return [group for group in groups if group is not None]


def grad_norm_and_found_inf(
    grads: list[Tensor], counted_in_norm: list[bool], parallel: ParallelState, sharded_over_dp: bool = False
) -> tuple[float, bool]:
    """Return (global L2 norm of the counted gradients, whether any gradient on any rank is inf/nan).

    `counted_in_norm[i]` is False for a TP-duplicated parameter on a TP rank other than 0 and for the last
    stage's copy of the tied embedding. The norm is
    computed in fp32 from the per-tensor norms; it is meaningless (inf/nan) when found_inf is True.
    `sharded_over_dp`: `grads` are this rank's shard of the gradient (distributed optimizer).
    """
    if len(grads) != len(counted_in_norm):
        raise ValueError(f"{len(grads)} gradients but {len(counted_in_norm)} counted_in_norm flags")
    stats = torch.zeros(2, dtype=torch.float32, device=grads[0].device if grads else "cpu")
    if grads:
        norms = torch.stack(torch._foreach_norm(grads)).float()
        counted = torch.tensor(counted_in_norm, device=norms.device)
        # Where selects the counted squares without multiplying a nan/inf by 0 (which would give nan).
        stats[0] = torch.where(counted, norms.square(), torch.zeros_like(norms)).sum()
        stats[1] = (~torch.isfinite(norms)).sum()
    for group in norm_reduction_groups(parallel, sharded_over_dp):
        all_reduce(stats, group)
    sum_of_squares, num_nonfinite = stats.tolist()
    return sum_of_squares**0.5, num_nonfinite > 0


def clip_grads_(grads: list[Tensor], max_norm: float, total_norm: float) -> None:
    """Scale `grads` in place by max_norm / (total_norm + 1e-6) when that factor is below 1."""
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def count_zeros(
    grads: list[Tensor], counted: list[bool], parallel: ParallelState, sharded_over_dp: bool = False
) -> float:
    """Number of zero elements in the counted gradients of the whole model (Megatron's num_zeros_in_grad)."""
    device = grads[0].device if grads else "cpu"
    total = torch.zeros((), dtype=torch.float64, device=device)
    for grad, is_counted in zip(grads, counted):
        if is_counted:
            total += grad.numel() - torch.count_nonzero(grad)
    for group in norm_reduction_groups(parallel, sharded_over_dp):
        all_reduce(total, group)
    return float(total)


def l2_norm(
    tensors: list[Tensor], counted: list[bool], parallel: ParallelState, sharded_over_dp: bool = False
) -> float:
    """sqrt of the sum of squares of the counted tensors of the whole model (e.g. the parameter norm)."""
    chosen = [t.detach() for t, is_counted in zip(tensors, counted) if is_counted]
    device = tensors[0].device if tensors else "cpu"
    sum_of_squares = torch.zeros((), dtype=torch.float32, device=device)
    if chosen:
        sum_of_squares += torch.stack(torch._foreach_norm(chosen)).float().square().sum()
    for group in norm_reduction_groups(parallel, sharded_over_dp):
        all_reduce(sum_of_squares, group)
    return float(sum_of_squares) ** 0.5
