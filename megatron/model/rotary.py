"""Rotary position embeddings (RoPE; Su et al. 2021, "RoFormer"), in Megatron-LM's and Hugging Face Llama's
non-interleaved "rotate half" form.

A head vector x of size d has its first r = rotary_percent x d dims rotated (r even; the rest pass through).
With the inverse frequencies f_i = rotary_base^(-2 i / r), i = 0 .. r/2 - 1, the angle of position p is
a_i = p f_i, and the pairs (x_i, x_{i + r/2}) are rotated by a_i:

    y_i       = x_i cos a_i - x_{i + r/2} sin a_i
    y_{i+r/2} = x_{i + r/2} cos a_i + x_i sin a_i

i.e. y = x cos(a') + rotate_half(x) sin(a') with a' = [a, a] and rotate_half([x1, x2]) = [-x2, x1].
Queries and keys are rotated before attention, so q_m . k_n depends on the positions only through m - n.
Angles come from the position ids (so --reset-position-ids restarts them per document, and a KV cache
continues them) and are computed and applied in fp32. Every TP rank computes the same angles: RoPE acts on
each head independently, so it is unaffected by how heads are split over ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def rotary_dim(kv_channels: int, rotary_percent: float) -> int:
    """The number r of rotated dims of each head: int(kv_channels x rotary_percent) (Megatron's rounding)."""
    return int(kv_channels * rotary_percent)


class RotaryEmbedding(nn.Module):
    """position_ids [batch, seq] -> (cos, sin) of the angles [a, a], each fp32 [batch, seq, r]."""

    def __init__(self, kv_channels: int, rotary_percent: float, rotary_base: int) -> None:
        super().__init__()
        dim = rotary_dim(kv_channels, rotary_percent)
        if dim <= 0 or dim % 2 != 0:
            raise ValueError(
                f"rotary embeddings need an even, positive rotary dimension; --kv-channels {kv_channels} x "
                f"--rotary-percent {rotary_percent} gives {dim}"
            )
        inv_freq = 1.0 / (rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        angles = position_ids.to(torch.float32)[..., None] * self.inv_freq.to(torch.float32)
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary_pos_emb(x: Tensor, rotary_pos_emb: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate x [batch, heads, seq, d] by the (cos, sin) [batch, seq, r] of RotaryEmbedding (module
    docstring); computed in fp32, returned in x's dtype. The last d - r dims are unchanged."""
    cos, sin = (t[:, None] for t in rotary_pos_emb)  # broadcast over heads
    r = cos.size(-1)
    rotated, passed = x[..., :r].float(), x[..., r:]
    first, second = rotated.chunk(2, dim=-1)
    out = (rotated * cos + torch.cat([-second, first], dim=-1) * sin).to(x.dtype)
    return torch.cat([out, passed], dim=-1) if passed.size(-1) else out
