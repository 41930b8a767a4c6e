"""Small helpers of the model: GeLU, ALiBi slopes, which parameters are split over TP, and FLOP counts."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def gelu(x: Tensor, tanh_form: bool) -> Tensor:
    """GeLU(x) = x * Phi(x) (erf form), or 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) when `tanh_form`."""
    return F.gelu(x, approximate="tanh" if tanh_form else "none")


def init_normal_(weight: Tensor, std: float) -> Tensor:
    """Fill `weight` in place with N(0, std^2) drawn from the default torch generator."""
    return torch.nn.init.normal_(weight, mean=0.0, std=std)


def draw_init_seed() -> int:
    """One draw from the default torch generator: the base seed of a model's initialisation."""
    return int(torch.randint(0, 2**62, (1,)).item())


@contextmanager
def init_rng(base_seed: int, unit: int) -> Iterator[None]:
    """Run the block with the default CPU generator seeded base_seed + unit, then restore it.

    A model initialises each unit (0: embedding, 1 + n: transformer layer n, L + 1: the output heads)
    under its own seed, so a pipeline stage that builds only layers 4..7 draws the same weights for them as
    a model that builds everything: initialisation does not depend on the pipeline layout.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(base_seed + unit)
        yield


def alibi_slopes(num_heads: int) -> Tensor:
    """BLOOM's ALiBi slopes m_1..m_n, one per attention head (fp32 [num_heads]).

    With p = 2^floor(log2 n) the largest power of two <= n, the first p slopes are the geometric sequence
    m_i = 2^(-8 i / p), i = 1..p. When n is not a power of two, the remaining n - p slopes are taken from
    the sequence of 2p heads at the odd positions: 2^(-4 j / p), j = 1, 3, 5, ..., 2 (n - p) - 1.
    """
    if num_heads < 1:
        raise ValueError(f"num_attention_heads must be >= 1 for ALiBi, got {num_heads}")
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = [2.0 ** (-8.0 * i / closest) for i in range(1, closest + 1)]
    slopes += [2.0 ** (-4.0 * j / closest) for j in range(1, 2 * (num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


# Parameters split over the tensor-parallel group, by the suffix of their state-dict name, and the
# dimension they are split along. Every other parameter is duplicated on all TP ranks.
_TP_PARTITION_DIMS = {
    "word_embeddings.weight": 0,  # vocabulary rows
    "self_attention.query_key_value.weight": 0,  # whole heads ([heads, 3, head_dim] rows)
    "self_attention.query_key_value.bias": 0,
    "self_attention.dense.weight": 1,  # input columns = this rank's heads
    "mlp.dense_h_to_4h.weight": 0,
    "mlp.dense_h_to_4h.bias": 0,
    "mlp.dense_4h_to_h.weight": 1,
    "lm_head.bias": 0,  # vocabulary entries, like word_embeddings
}


def tensor_parallel_dim(param_name: str) -> Optional[int]:
    """The dimension along which the parameter named `param_name` (a state-dict key) is split over TP ranks,
    or None when every TP rank holds the whole tensor. Shard r of p is the r-th of p equal slices."""
    for suffix, dim in _TP_PARTITION_DIMS.items():
        if param_name == suffix or param_name.endswith("." + suffix):
            return dim
    return None


def model_flops(
    batch_size: int, seq_length: int, num_layers: int, hidden_size: int, vocab_size: int
) -> float:
    """Model FLOPs of one iteration over `batch_size` sequences (forward + backward, no recompute).

    Megatron's count (Narayanan et al. 2021), matrix multiplications only, with ffn = 4h:

        72 B s L h^2 (1 + s / (6 h) + V / (12 L h))

    A layer's forward pass costs 24 B s h^2 (QKV 6, attention output 2, MLP 16) + 4 B s^2 h (QK^T and
    attention x V); the logit layer 2 B s h V; backward costs twice the forward, hence the factor 3.
    """
    b, s, n_layers, h, v = batch_size, seq_length, num_layers, hidden_size, vocab_size
    return 72.0 * b * s * n_layers * h * h * (1.0 + s / (6.0 * h) + v / (12.0 * n_layers * h))


def hardware_flops(
    batch_size: int,
    seq_length: int,
    num_layers: int,
    hidden_size: int,
    vocab_size: int,
    recompute_granularity: Optional[str],
) -> float:
    """FLOPs the hardware actually does in one iteration: the model FLOPs plus what activation recompute
    runs a second time in backward (the logit layer is never recomputed):

        'full':       + one forward of every layer, 24 B s L h^2 (1 + s / (6 h)); in total
                      96 B s L h^2 (1 + s / (6 h) + V / (16 L h))
        'selective':  + the attention core QK^T and (attention x V), 4 B s^2 L h
        None:         model_flops(...)
    """
    b, s, n_layers, h = batch_size, seq_length, num_layers, hidden_size
    flops = model_flops(b, s, n_layers, h, vocab_size)
    if recompute_granularity == "full":
        return flops + 24.0 * b * s * n_layers * h * h * (1.0 + s / (6.0 * h))
    if recompute_granularity == "selective":
        return flops + 4.0 * b * s * s * n_layers * h
    if recompute_granularity is None:
        return flops
    raise ValueError(
        f"recompute_granularity must be None, 'full' or 'selective', got {recompute_granularity!r}"
    )
