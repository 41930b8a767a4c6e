"""BERT: a bidirectional transformer with a masked-LM head (tied decoder) and a next-sentence (binary) head."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from megatron.model.config import TransformerConfig
from megatron.model.language_model import (
    TransformerLanguageModel,
    mark_pipeline_tied,
    normal_linear,
    output_embedding_weight,
    parallel_lm_logits,
    word_embeddings_for_head,
)
from megatron.model.transformer import LayerNorm
from megatron.model.utils import gelu
from megatron.parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron.parallel.layers import set_tensor_model_parallel_attributes
from megatron.parallel.pipeline_layout import StageLayout
from megatron.parallel.state import ParallelState


class BertLMHead(nn.Module):
    """Masked-LM head: LN(GeLU(dense(h))) @ E_r^T + b_r, with E_r this rank's slice of the word embeddings
    (tied decoder) and b_r its slice of the vocabulary bias `lm_head.bias` [V/p]."""

    def __init__(self, config: TransformerConfig, parallel: ParallelState) -> None:
        super().__init__()
        self.parallel = parallel
        self.gelu_tanh = config.gelu_tanh
        self.bias = nn.Parameter(
            torch.zeros(config.padded_vocab_size // parallel.tp_size, dtype=config.params_dtype)
        )
        set_tensor_model_parallel_attributes(self.bias, is_parallel=True, partition_dim=0)
        self.dense = normal_linear(config.hidden_size, config.hidden_size, config)
        self.layernorm = LayerNorm(
            config.hidden_size, eps=config.layernorm_epsilon, dtype=config.params_dtype
        )

    def forward(self, hidden: Tensor, word_embeddings_weight: Tensor, parallel_output: bool) -> Tensor:
        """hidden [batch, seq, h] -> logits [batch, seq, V/p] ([batch, seq, V] when not parallel_output)."""
        hidden = self.layernorm(gelu(self.dense(hidden), self.gelu_tanh))
        return parallel_lm_logits(
            hidden, word_embeddings_weight, self.parallel, parallel_output, bias=self.bias
        )


class BertModel(nn.Module):
    """BERT with token-type embeddings, a bidirectional transformer, pooler, MLM head and binary head.

    The layernorm placement is pre-LN (the rearranged order of the Megatron-LM paper, which trains stably
    at scale) unless config.apply_residual_connection_post_layernorm selects the original BERT order. The
    pooler and binary (next-sentence) head exist only when config.add_binary_head.

    `stage` builds one pipeline stage, as for GPTModel: the pooler, MLM head and binary head live on the
    last stage, which returns (MLM logits or loss, binary logits); earlier stages return their hidden
    states [batch, seq, h].
    """

    def __init__(
        self,
        config: TransformerConfig,
        parallel: ParallelState,
        parallel_output: bool = True,
        stage: Optional[StageLayout] = None,
    ) -> None:
        super().__init__()
        if config.untie_embeddings_and_output_weights:
            raise ValueError(
                "--untie-embeddings-and-output-weights: BERT's LM head is tied to the word embeddings"
            )
        self.parallel = parallel
        self.parallel_output = parallel_output
        self.language_model = TransformerLanguageModel(
            config, parallel, causal=False, add_pooler=config.add_binary_head, stage=stage
        )
        self.post_process = self.language_model.stage.post_process
        self.lm_head: Optional[BertLMHead] = None
        self.binary_head: Optional[nn.Linear] = None
        if self.post_process:
            self.lm_head = BertLMHead(config, parallel)
            if config.add_binary_head:
                self.binary_head = normal_linear(config.hidden_size, 2, config)
            if not self.language_model.stage.pre_process:
                self.word_embeddings_for_head = word_embeddings_for_head(self.language_model)
        mark_pipeline_tied(self)

    def set_input_tensor(self, input_tensor: Optional[Tensor]) -> None:
        """The previous pipeline stage's output [batch, seq, h], the input of the next forward."""
        self.language_model.set_input_tensor(input_tensor)

    def forward(
        self,
        input_ids: Tensor,
        padding_mask: Tensor,
        tokentype_ids: Optional[Tensor] = None,
        lm_labels: Optional[Tensor] = None,
    ) -> Union[tuple[Tensor, Optional[Tensor]], Tensor]:
        """-> (MLM logits [batch, seq, V/p] or, with lm_labels, the fp32 per-token loss [batch, seq];
        next-sentence logits [batch, 2] or None without a binary head); the hidden states [batch, seq, h] alone
        on a pipeline stage before the last.

        input_ids, tokentype_ids, lm_labels: [batch, seq] int; padding_mask: [batch, seq], 1 (or True) for
        real tokens and 0 for padding. Padding keys are masked out for every query; outputs at padded
        positions are meaningless and must be excluded by the loss mask. Positions are 0 .. seq-1.
        """
        seq = input_ids.size(1)
        position_ids = torch.arange(seq, device=input_ids.device).unsqueeze(0).expand_as(input_ids)
        allowed = padding_mask.bool()[:, None, None, :]  # [batch, 1, 1, seq]: which keys can be attended to
        hidden, pooled = self.language_model(input_ids, position_ids, allowed, tokentype_ids)
        if not self.post_process:
            return hidden
        weight = output_embedding_weight(self)
        binary_logits = self.binary_head(pooled) if self.binary_head is not None else None
        if lm_labels is None:
            return self.lm_head(hidden, weight, self.parallel_output), binary_logits
        logits = self.lm_head(hidden, weight, parallel_output=True)
        return vocab_parallel_cross_entropy(logits.float(), lm_labels, self.parallel.tp_group), binary_logits
