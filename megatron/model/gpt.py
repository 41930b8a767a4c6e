"""GPT: a causal (decoder-only) transformer language model with tied input/output embeddings."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from megatron.model.config import TransformerConfig
from megatron.model.language_model import (
    TransformerLanguageModel,
    mark_pipeline_tied,
    output_embedding_weight,
    parallel_lm_logits,
    word_embeddings_for_head,
)
from megatron.model.transformer import InferenceParams
from megatron.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.parallel.pipeline_layout import StageLayout
from megatron.parallel.state import ParallelState


class GPTModel(nn.Module):
    """GPT-2 style model: embeddings -> pre-LN transformer (causal) -> final layernorm -> tied logits.

    Every TP rank holds 1/p of the vocabulary rows of the word embeddings, 1/p of the heads and of the MLP
    columns (megatron.model.transformer); the logits are split over the vocabulary. Parameters are drawn
    from the default torch generator as full tensors and sliced, so the same seed gives the same model at
    any TP size, and at any pipeline layout (a stage draws the whole model's weights up to its own).

    `stage` builds one pipeline stage (megatron.parallel.pipeline_layout): its forward then takes the
    previous stage's hidden states through `set_input_tensor` and, except on the last stage, returns its
    hidden states [batch, seq, h]. A last stage that does not hold the embedding keeps its own copy of the
    tied weight, `word_embeddings_for_head`.
    """

    def __init__(
        self,
        config: TransformerConfig,
        parallel: ParallelState,
        parallel_output: bool = True,
        stage: Optional[StageLayout] = None,
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.parallel_output = parallel_output
        self.sequence_parallel = config.sequence_parallel and parallel.tp_size > 1
        self.language_model = TransformerLanguageModel(
            config, parallel, causal=True, add_pooler=False, gather_sequence_output=False, stage=stage
        )
        self.post_process = self.language_model.stage.post_process
        if (
            self.post_process
            and not self.language_model.stage.pre_process
            and self.language_model.tied_output
        ):
            self.word_embeddings_for_head = word_embeddings_for_head(self.language_model)
        mark_pipeline_tied(self)

    def set_input_tensor(self, input_tensor: Optional[Tensor]) -> None:
        """The previous pipeline stage's output [batch, seq, h], the input of the next forward."""
        self.language_model.set_input_tensor(input_tensor)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        inference_params: Optional[InferenceParams] = None,
    ) -> Tensor:
        """Logits, or the per-token loss when `labels` are given (the hidden states on a stage before the last).

        input_ids, position_ids, labels: [batch, seq] int. attention_mask: None (plain causal attention) or
        Megatron's boolean mask broadcastable to [batch, 1, seq, seq], True where attention is NOT allowed
        (e.g. across document boundaries); the causal mask is applied in any case.

        Returns logits [batch, seq, V/p] (this rank's vocabulary slice; the full [batch, seq, V] when built
        with parallel_output=False) when labels is None, else the fp32 cross-entropy loss [batch, seq] per
        token, computed vocab-parallel (averaging over the loss mask is the caller's job).

        inference_params: the KV cache of incremental decoding (megatron.model.transformer.InferenceParams).
        input_ids are then only the new tokens, position_ids their positions (offset .. offset + seq - 1,
        offset = inference_params.sequence_len_offset), and a given attention_mask covers [seq, offset + seq].
        """
        allowed = None
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise TypeError(
                    f"attention_mask must be a bool tensor (True = masked), got {attention_mask.dtype}"
                )
            allowed = ~attention_mask
        hidden, _ = self.language_model(input_ids, position_ids, allowed, inference_params=inference_params)
        if not self.post_process:
            return hidden
        weight = output_embedding_weight(self)
        sp = self.sequence_parallel  # hidden holds this rank's s/p positions: gathered for the output layer
        if labels is None:
            return parallel_lm_logits(
                hidden, weight, self.parallel, self.parallel_output, sequence_parallel=sp
            )
        logits = parallel_lm_logits(hidden, weight, self.parallel, parallel_output=True, sequence_parallel=sp)
        return vocab_parallel_cross_entropy(logits.float(), labels, self.parallel.tp_group)
