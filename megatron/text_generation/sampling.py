"""Choosing the next token from the logits: greedy, or sampling with temperature, top-k or top-p.

With logits z over the vocabulary (one row per sequence), Megatron-LM's rules:

    top_k == 1          greedy: argmax_v z_v (temperature and top-p are irrelevant)
    otherwise           sample v ~ softmax(z' / T), where z' is z with the filtered-out entries set to -inf:
      top_k > 1         keep the k largest logits (entries tied with the k-th largest are kept too)
      top_p > 0         keep the nucleus (Holtzman et al. 2019): the smallest set of most probable tokens
                        whose probabilities under softmax(z / T) sum to at least p
      neither           keep everything (plain sampling from the temperature-scaled distribution)

top_k > 1 and top_p > 0 together are rejected, as in Megatron-LM. Randomness comes only from the
`torch.Generator` passed in, so a seed fixes the samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token (see the module docstring). Raises ValueError for an invalid combination."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0

    def __post_init__(self) -> None:
        if not self.temperature > 0.0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.top_k > 1 and self.top_p > 0.0:
            raise ValueError(f"cannot combine top-k ({self.top_k}) and top-p ({self.top_p}) sampling")
        if self.top_k == 1 and self.top_p > 0.0:
            raise ValueError(f"top_k = 1 is greedy decoding; top_p ({self.top_p}) cannot be combined with it")

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (top_k == 1)."""
        return self.top_k == 1


GREEDY = SamplingParams(top_k=1)


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """A copy of logits [..., V] with every entry below the row's k-th largest set to -inf."""
    if not 1 <= top_k <= logits.size(-1):
        raise ValueError(f"top_k must be between 1 and the vocabulary size {logits.size(-1)}, got {top_k}")
    kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """A copy of logits [..., V] keeping, per row, the smallest set of most probable tokens whose softmax
    probabilities sum to >= top_p (at least one token); the others are set to -inf.

    In descending order of probability, token i is kept when the mass of the tokens before it is < top_p.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    remove_sorted = mass_before >= top_p
    remove_sorted[..., 0] = False  # the most probable token always stays
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample(logits: Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None) -> Tensor:
    """The next token of each row of logits [batch, V]: int64 [batch] (see the module docstring)."""
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape [batch, vocab], got {tuple(logits.shape)}")
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    scaled = logits.float() / params.temperature
    if params.top_k > 1:
        scaled = top_k_filter(scaled, params.top_k)
    elif params.top_p > 0.0:
        scaled = top_p_filter(scaled, params.top_p)
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).view(-1)
