"""Small helpers of the model: GeLU, ALiBi slopes, which parameters are split over TP, and FLOP counts."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def gelu(x: Tensor, tanh_form: bool) -> Tensor:
    """GeLU(x) = x * Phi(x) (erf form), or 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) when `tanh_form`."""
    return F.gelu(x, approximate="tanh" if tanh_form else "none")


def init_normal_(weight: Tensor, std: float) -> Tensor:
    """Fill `weight` in place with N(0, std^2) drawn from the default torch generator."""
    return torch.nn.init.normal_(weight, mean=0.0, std=std)


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
    "self_attention.query_key_value.weight": 0,  # whole heads ([heads, 3, head_dim] rows) or query groups
    "self_attention.query_key_value.bias": 0,
    "self_attention.dense.weight": 1,  # input columns = this rank's heads
    "mlp.dense_h_to_4h.weight": 0,  # SwiGLU: [gate slice; up slice] per shard (tools/checkpoint/tp_layout)
    "mlp.dense_h_to_4h.bias": 0,
    "mlp.dense_4h_to_h.weight": 1,
    "lm_head.bias": 0,  # vocabulary entries, like word_embeddings
    "output_layer.weight": 0,  # untied output layer: vocabulary rows, like word_embeddings
}


def tensor_parallel_dim(param_name: str) -> Optional[int]:
    """The dimension along which the parameter named `param_name` (a state-dict key) is split over TP ranks,
    or None when every TP rank holds the whole tensor. Shard r of p is the r-th of p equal slices."""
    for suffix, dim in _TP_PARTITION_DIMS.items():
        if param_name == suffix or param_name.endswith("." + suffix):
            return dim
    return None


def _layer_terms(
    hidden_size: int,
    seq_length: int,
    ffn_hidden_size: Optional[int],
    num_attention_heads: Optional[int],
    kv_channels: Optional[int],
    num_query_groups: Optional[int],
    swiglu: bool,
) -> tuple[float, float]:
    """(dense, attention core) forward FLOPs of one layer per token, in units of 4 h^2 (module formulas)."""
    h = hidden_size
    query = (
        1.0 if num_attention_heads is None or kv_channels is None else num_attention_heads * kv_channels / h
    )
    groups = (
        1.0
        if num_query_groups is None or num_attention_heads is None
        else num_query_groups / num_attention_heads
    )
    ffn = 4.0 if ffn_hidden_size is None else ffn_hidden_size / h
    return (1.0 + groups) * query + ffn * (1.5 if swiglu else 1.0), seq_length / h * query


def model_flops(
    batch_size: int,
    seq_length: int,
    num_layers: int,
    hidden_size: int,
    vocab_size: int,
    *,
    ffn_hidden_size: Optional[int] = None,
    num_attention_heads: Optional[int] = None,
    kv_channels: Optional[int] = None,
    num_query_groups: Optional[int] = None,
    swiglu: bool = False,
) -> float:
    """Model FLOPs of one iteration over `batch_size` sequences (forward + backward, no recompute).

    Megatron's count (Narayanan et al. 2021; the general form of Megatron-LM's training.py), matrix
    multiplications only, 2 FLOPs per multiply-add, backward twice the forward. With n heads of size d,
    G query groups (key/value heads), MLP width f:

        12 B s L h^2 ((1 + G/n + s/h) (n d / h) + (f / h) (3/2 if SwiGLU) + V / (2 L h))

    A layer's forward: QKV 2 B s h (n d + 2 G d) (GQA's K and V are G d wide), attention output
    2 B s n d h, QK^T and attention x V 4 B s^2 n d, MLP 2 B s h f per matrix (SwiGLU has three: gate, up,
    down; GeLU two); the logit layer 2 B s h V, the same matmul whether its weight is tied to the word
    embeddings or an untied output layer (untying adds V h parameters, not FLOPs). With the defaults
    (n d = h, G = n, f = 4 h, GeLU) this is 72 B s L h^2 (1 + s / (6 h) + V / (12 L h)).
    """
    b, s, n_layers, h, v = batch_size, seq_length, num_layers, hidden_size, vocab_size
    dense, core = _layer_terms(
        h, s, ffn_hidden_size, num_attention_heads, kv_channels, num_query_groups, swiglu
    )
    return 12.0 * b * s * n_layers * h * h * (dense + core + v / (2.0 * n_layers * h))


def hardware_flops(
    batch_size: int,
    seq_length: int,
    num_layers: int,
    hidden_size: int,
    vocab_size: int,
    recompute_granularity: Optional[str],
    **shape: Any,
) -> float:
    """FLOPs the hardware actually does in one iteration: the model FLOPs plus what activation recompute
    runs a second time in backward (the logit layer is never recomputed). `shape`: model_flops's keyword
    arguments (ffn_hidden_size, num_attention_heads, kv_channels, num_query_groups, swiglu). For GPT:

        'full':       + one forward of every layer, 24 B s L h^2 (1 + s / (6 h)); in total
                      96 B s L h^2 (1 + s / (6 h) + V / (16 L h))
        'selective':  + the attention core QK^T and (attention x V), 4 B s^2 L h (n d / h)
        None:         model_flops(...)
    """
    b, s, n_layers, h = batch_size, seq_length, num_layers, hidden_size
    flops = model_flops(b, s, n_layers, h, vocab_size, **shape)
    terms = _layer_terms(
        h, s, shape.get("ffn_hidden_size"), shape.get("num_attention_heads"), shape.get("kv_channels"),
        shape.get("num_query_groups"), shape.get("swiglu", False),
    )  # fmt: skip
    if recompute_granularity == "full":
        return flops + 4.0 * b * s * n_layers * h * h * (terms[0] + terms[1])
    if recompute_granularity == "selective":
        return flops + 4.0 * b * s * n_layers * h * h * terms[1]
    if recompute_granularity is None:
        return flops
    raise ValueError(
        f"recompute_granularity must be None, 'full' or 'selective', got {recompute_granularity!r}"
    )
