"""BERT with a task head on the pooled [CLS] output: sentence-pair classification and multiple choice.

    pooled = tanh(W_p h_[CLS] + b_p)                       (BERT's pooler, from the pretrained model)
    Classification:   logits = W_c dropout(pooled) + b_c   W_c: [num_classes, h]        -> [batch, C]
    MultipleChoice:   each of the k choices is one sequence; score_i = w . dropout(pooled_i) + b
                      (w: [1, h]), and the k scores are the logits of a softmax over choices -> [batch, k]

The encoder is BERT's (`language_model`, with token types and the pooler), so a pretrained BERT
checkpoint loads into it; its masked-LM and next-sentence heads are not used. The task heads are small
and duplicated on every tensor-parallel rank (their dropout draws the same mask on all of them). State
dict names follow Megatron-LM: `language_model.*`, `classification_head.*`, `multichoice_head.*`.

`stage` builds one pipeline stage as BERT's stages are built (megatron.model.bert): the first stage holds
the embedding, every stage its block of layers, the last stage the final layernorm, the pooler and the task
head. A stage before the last returns its hidden states [sequences, seq, h] (for MultipleChoice one
sequence per choice, batch x k of them), which the schedule hands to the next stage's `set_input_tensor`.
There is no output layer, so nothing is tied across stages. The loss is the schedule's (the caller's
loss function on the last stage's logits), never computed here.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.model import TransformerConfig
from megatron.model.language_model import TransformerLanguageModel, normal_linear
from megatron.parallel.pipeline_layout import StageLayout
from megatron.parallel.state import ParallelState


class _PooledBert(nn.Module):
    """BERT's encoder with token types (2) and the pooler: input ids -> dropout(pooled) [batch, h], or
    one pipeline stage of it."""

    def __init__(
        self, config: TransformerConfig, parallel: ParallelState, stage: Optional[StageLayout]
    ) -> None:
        super().__init__()
        config = dataclasses.replace(config, num_tokentypes=2)
        self.dropout_p = config.hidden_dropout
        self.language_model = TransformerLanguageModel(
            config, parallel, causal=False, add_pooler=True, stage=stage
        )
        layout = self.language_model.stage
        self.post_process = layout.post_process
        if layout.post_process and not layout.pre_process and self.language_model.tied_output:
            self.language_model.take_drawn_word_embeddings()  # no output layer: the drawn copy is not kept

    def set_input_tensor(self, input_tensor: Optional[Tensor]) -> None:
        """The previous pipeline stage's output [sequences, seq, h], the input of the next forward."""
        self.language_model.set_input_tensor(input_tensor)

    def encode(self, input_ids: Tensor, padding_mask: Tensor, tokentype_ids: Tensor) -> Tensor:
        """input_ids, padding_mask (1 = real token), tokentype_ids: [batch, seq] -> [batch, h]; the hidden
        states [batch, seq, h] on a stage before the last."""
        position_ids = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
        allowed = padding_mask.bool()[:, None, None, :]  # which keys each query may attend to
        hidden, pooled = self.language_model(input_ids, position_ids, allowed, tokentype_ids)
        if not self.post_process:
            return hidden
        return F.dropout(pooled, p=self.dropout_p, training=self.training)


class Classification(_PooledBert):
    """BERT + linear head h -> num_classes on the pooled output (MNLI, QQP)."""

    def __init__(
        self,
        config: TransformerConfig,
        parallel: ParallelState,
        num_classes: int,
        stage: Optional[StageLayout] = None,
    ) -> None:
        super().__init__(config, parallel, stage)
        if self.post_process:
            self.classification_head = normal_linear(config.hidden_size, num_classes, config)

    def forward(self, input_ids: Tensor, padding_mask: Tensor, tokentype_ids: Tensor) -> Tensor:
        """[batch, seq] inputs -> logits [batch, num_classes] (hidden states before the last stage)."""
        encoded = self.encode(input_ids, padding_mask, tokentype_ids)
        return self.classification_head(encoded) if self.post_process else encoded


class MultipleChoice(_PooledBert):
    """BERT + linear head h -> 1 scoring each choice; logits over the choices of a question (RACE)."""

    def __init__(
        self, config: TransformerConfig, parallel: ParallelState, stage: Optional[StageLayout] = None
    ) -> None:
        super().__init__(config, parallel, stage)
        if self.post_process:
            self.multichoice_head = normal_linear(config.hidden_size, 1, config)

    def forward(self, input_ids: Tensor, padding_mask: Tensor, tokentype_ids: Tensor) -> Tensor:
        """[batch, choices, seq] inputs (one sequence per choice) -> logits [batch, choices]; before the
        last stage the hidden states [batch x choices, seq, h]."""
        batch, choices, seq = input_ids.shape
        encoded = self.encode(
            input_ids.reshape(-1, seq), padding_mask.reshape(-1, seq), tokentype_ids.reshape(-1, seq)
        )
        if not self.post_process:
            return encoded
        return self.multichoice_head(encoded).view(batch, choices)
