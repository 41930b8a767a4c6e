"""BERT with a task head on the pooled [CLS] output: sentence-pair classification and multiple choice.

    pooled = tanh(W_p h_[CLS] + b_p)                       (BERT's pooler, from the pretrained model)
    Classification:   logits = W_c dropout(pooled) + b_c   W_c: [num_classes, h]        -> [batch, C]
    MultipleChoice:   each of the k choices is one sequence; score_i = w . dropout(pooled_i) + b
                      (w: [1, h]), and the k scores are the logits of a softmax over choices -> [batch, k]

The encoder is BERT's (`language_model`, with token types and the pooler), so a pretrained BERT
checkpoint loads into it; its masked-LM and next-sentence heads are not used. The task heads are small
and duplicated on every tensor-parallel rank (their dropout draws the same mask on all of them). State
dict names follow Megatron-LM: `language_model.*`, `classification_head.*`, `multichoice_head.*`.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.model import TransformerConfig
from megatron.model.language_model import TransformerLanguageModel, normal_linear
from megatron.parallel.state import ParallelState


class _PooledBert(nn.Module):
    """BERT's encoder with token types (2) and the pooler: input ids -> dropout(pooled) [batch, h]."""

    def __init__(self, config: TransformerConfig, parallel: ParallelState) -> None:
        super().__init__()
        config = dataclasses.replace(config, num_tokentypes=2)
        self.dropout_p = config.hidden_dropout
        self.language_model = TransformerLanguageModel(config, parallel, causal=False, add_pooler=True)

    def pooled(self, input_ids: Tensor, padding_mask: Tensor, tokentype_ids: Tensor) -> Tensor:
        """input_ids, padding_mask (1 = real token), tokentype_ids: [batch, seq] -> [batch, h]."""
        position_ids = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
        allowed = padding_mask.bool()[:, None, None, :]  # which keys each query may attend to
        _, pooled = self.language_model(input_ids, position_ids, allowed, tokentype_ids)
        return F.dropout(pooled, p=self.dropout_p, training=self.training)


class Classification(_PooledBert):
    """BERT + linear head h -> num_classes on the pooled output (MNLI, QQP)."""

    def __init__(self, config: TransformerConfig, parallel: ParallelState, num_classes: int) -> None:
        super().__init__(config, parallel)
        self.classification_head = normal_linear(config.hidden_size, num_classes, config)

    def forward(self, input_ids: Tensor, padding_mask: Tensor, tokentype_ids: Tensor) -> Tensor:
        """[batch, seq] inputs -> logits [batch, num_classes]."""
        return self.classification_head(self.pooled(input_ids, padding_mask, tokentype_ids))


class MultipleChoice(_PooledBert):
    """BERT + linear head h -> 1 scoring each choice; logits over the choices of a question (RACE)."""

    def __init__(self, config: TransformerConfig, parallel: ParallelState) -> None:
        super().__init__(config, parallel)
        self.multichoice_head = normal_linear(config.hidden_size, 1, config)

    def forward(self, input_ids: Tensor, padding_mask: Tensor, tokentype_ids: Tensor) -> Tensor:
        """[batch, choices, seq] inputs (one sequence per choice) -> logits [batch, choices]."""
        batch, choices, seq = input_ids.shape
        pooled = self.pooled(
            input_ids.reshape(-1, seq), padding_mask.reshape(-1, seq), tokentype_ids.reshape(-1, seq)
        )
        return self.multichoice_head(pooled).view(batch, choices)
