"""Turning GPT samples into model inputs: shifted labels, loss mask, position ids, document masks."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def get_ltor_masks_and_position_ids(
    tokens: Tensor, eod: int, reset_position_ids: bool, reset_attention_mask: bool, eod_mask_loss: bool
) -> tuple[Optional[Tensor], Tensor, Tensor]:
    """Masks for left-to-right models over samples that pack several documents.

    Returns (attention_mask, loss_mask, position_ids):
    - attention_mask: None for plain causal attention, or with `reset_attention_mask` a bool
      [batch, 1, seq, seq] tensor, True where a query may NOT see a key because the key lies in an earlier
      document (the end-of-document token belongs to the document it ends);
    - loss_mask: float [batch, seq], 0 on end-of-document tokens when `eod_mask_loss`;
    - position_ids: 0..seq-1, restarting after every end-of-document token when `reset_position_ids`.
    """
    batch, seq = tokens.shape
    is_eod = tokens == eod
    loss_mask = torch.ones(batch, seq, dtype=torch.float32, device=tokens.device)
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0
    index = torch.arange(seq, device=tokens.device).expand(batch, seq)
    position_ids = index.clone()
    if reset_position_ids:
        # The first position of the document that position j belongs to: one past the last EOD before j.
        starts = torch.zeros_like(index)
        starts[:, 1:] = torch.where(is_eod[:, :-1], index[:, 1:], torch.zeros_like(index[:, 1:]))
        position_ids = index - torch.cummax(starts, dim=1).values
    attention_mask = None
    if reset_attention_mask:
        document = torch.cumsum(is_eod.long(), dim=1) - is_eod.long()
        attention_mask = (document[:, :, None] != document[:, None, :]).unsqueeze(1)
    return attention_mask, loss_mask, position_ids
