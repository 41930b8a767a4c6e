"""Give every parameter of a model random values, so that equivalence tests can fail.

A fresh model has zero biases and unit norm weights: a bias added on every TP rank, or a norm gradient
left unreduced, changes nothing there. `randomize_parameters_` draws every parameter (norm weights around
1, everything else around 0, all with a visible spread) from a generator seeded by the parameter's name,
as the full single-process tensor, and keeps this TP rank's slice of it: a model built at any TP size
gets the same random model.
"""

from __future__ import annotations

import zlib
from typing import Optional

import torch
from torch import nn

from megatron.model.utils import tensor_parallel_dim
from megatron.parallel.state import ParallelState


def randomize_parameters_(
    model: nn.Module, seed: int = 0, parallel: Optional[ParallelState] = None, std: float = 0.1
) -> None:
    """Every parameter <- this rank's slice of N(0, std^2) (+1 for norm weights) drawn at full size."""
    tp_size, tp_rank = (parallel.tp_size, parallel.tp_rank) if parallel is not None else (1, 0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            dim = tensor_parallel_dim(name) if tp_size > 1 else None
            shape = list(param.shape)
            if dim is not None:
                shape[dim] *= tp_size
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            values = torch.randn(shape, generator=g, dtype=torch.float32) * std
            if "norm" in name and name.endswith("weight"):
                values += 1.0
            if dim is not None:
                values = torch.chunk(values, tp_size, dim=dim)[tp_rank]
            param.copy_(values.to(param.dtype))
