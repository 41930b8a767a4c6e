"""Evaluation loops shared by the tasks: a sum over a dataset, computed data-parallel and exact."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from megatron.parallel.collectives import reduce_scalars
from megatron.parallel.state import ParallelState
from tasks.data_utils import shard_range

BatchFn = Callable[[nn.Module, dict[str, Tensor]], Tensor]


def collate(items: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack the items' tensors key by key: a batch dict with a leading batch dimension."""
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


@torch.no_grad()
def sum_over_dataset(
    dataset: Dataset, batch_fn: BatchFn, model: nn.Module, batch_size: int, parallel: ParallelState
) -> float:
    """sum over all items of `batch_fn(model, batch)` (a scalar tensor per batch).

    Each data-parallel rank takes its contiguous share of the items (`shard_range`; nothing is dropped or
    repeated), in batches of `batch_size`; the per-rank sums (in float64) are all-reduced over the DP
    group, so every rank of a DP group returns the same total. Tensor-parallel ranks and pipeline stages of
    one model take the same share (under pipelining `batch_fn` returns 0 where it is not the last stage).
    """
    total = torch.zeros((), dtype=torch.float64)
    indices = shard_range(len(dataset), parallel.dp_rank, parallel.dp_size)  # type: ignore[arg-type]
    for start in range(0, len(indices), batch_size):
        batch = collate([dataset[i] for i in indices[start : start + batch_size]])
        total += batch_fn(model, batch).double().cpu()
    return reduce_scalars([float(total)], parallel.dp_group)[0]


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (batches are moved there)."""
    return next(model.parameters()).device
