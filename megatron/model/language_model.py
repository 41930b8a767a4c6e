"""Embeddings, pooler, the language model (embedding -> transformer -> final layernorm) and the tied logits.

The word embedding table is split over the vocabulary across TP ranks (rank r holds rows
r * V/p .. (r + 1) * V/p - 1); position and token-type embeddings are small and duplicated on every rank.
The output layer reuses the word embedding table (tied weights), so the logits come out split over the
vocabulary as well and the loss is computed without gathering them (vocab-parallel cross entropy). With
--untie-embeddings-and-output-weights the language model owns a separate `output_layer` [V/p, h], split
over the vocabulary the same way (column-parallel, no bias; Megatron's `language_model.output_layer`).
With RoPE there are no position embeddings: the language model turns the position ids into the rotary
angles that every attention layer applies to its queries and keys.

With sequence parallelism the embedding output is scattered over the sequence (rank r keeps positions
r s/p .. (r + 1) s/p - 1) before its dropout, the encoder works on those positions, and the sequence is
all-gathered again before the output layer (GPT: inside parallel_lm_logits, whose input gradient is then
reduce-scattered) or before the pooler and heads (BERT: `gather_sequence_output`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.model.config import TransformerConfig
from megatron.model.rotary import RotaryEmbedding
from megatron.model.transformer import InferenceParams, LayerNorm, ParallelTransformer, check_config
from megatron.model.utils import init_normal_
from megatron.parallel.layers import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    linear_with_sequence_gather,
)
from megatron.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.parallel.pipeline_layout import StageLayout
from megatron.parallel.random import get_rng_tracker
from megatron.parallel.state import ParallelState


def normal_linear(in_features: int, out_features: int, config: TransformerConfig) -> nn.Linear:
    """A plain (duplicated on every TP rank) linear layer with weight ~ N(0, init_method_std^2) and zero bias."""
    linear = nn.Linear(in_features, out_features, dtype=config.params_dtype)
    init_normal_(linear.weight, config.init_method_std)
    nn.init.zeros_(linear.bias)
    return linear


def parallel_lm_logits(
    hidden: Tensor,
    word_embeddings_weight: Tensor,
    parallel: ParallelState,
    parallel_output: bool,
    bias: Optional[Tensor] = None,
    sequence_parallel: bool = False,
) -> Tensor:
    """Logits with the tied output layer: f(hidden) @ E_r^T (+ bias_r) for this rank's vocabulary slice E_r.

    hidden [batch, seq, h], E_r [V/p, h] -> [batch, seq, V/p]; all-gathered to [batch, seq, V] when not
    `parallel_output`. f is the identity forward and sums the input gradient over TP ranks backward. With
    `sequence_parallel` hidden is [batch, s/p, h] and is all-gathered over the sequence instead of f (its
    gradient, a partial sum on each rank, is reduce-scattered back); only the s/p positions are kept for
    the weight gradient, all-gathered again in backward (megatron.parallel.layers).
    """
    if sequence_parallel:
        logits = linear_with_sequence_gather(hidden, word_embeddings_weight, bias, parallel.tp_group)
    else:
        hidden = copy_to_tensor_model_parallel_region(hidden, parallel.tp_group)
        logits = F.linear(hidden, word_embeddings_weight, bias)
    if parallel_output:
        return logits
    return gather_from_tensor_model_parallel_region(logits, parallel.tp_group)


class Embedding(nn.Module):
    """word (vocab-parallel) [+ BLOOM's layernorm on it] + learned position + token type, then dropout.

    Positions are skipped with ALiBi; token types only exist when config.num_tokentypes > 0 (BERT: 2), and
    tokentype_ids None then means all zeros (the first segment). The dropout uses the default RNG stream, the
    same on all TP ranks; with sequence parallelism the output is first scattered over the sequence and the
    dropout draws from the TP-rank stream.
    """

    def __init__(self, config: TransformerConfig, parallel: ParallelState) -> None:
        super().__init__()
        std, dtype = config.init_method_std, config.params_dtype
        self.dropout_p = config.hidden_dropout
        self.fp32_residual = config.fp32_residual_connection
        self.sequence_parallel = config.sequence_parallel and parallel.tp_size > 1
        self.tp_group = parallel.tp_group
        self.word_embeddings = VocabParallelEmbedding(
            config.padded_vocab_size, config.hidden_size, parallel=parallel, init_std=std, params_dtype=dtype
        )
        self.embedding_layernorm: Optional[LayerNorm] = None
        if config.embedding_layernorm:
            self.embedding_layernorm = LayerNorm(
                config.hidden_size, eps=config.layernorm_epsilon, dtype=dtype
            )
        self.position_embeddings: Optional[nn.Embedding] = None
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(
                config.max_position_embeddings, config.hidden_size, dtype=dtype
            )
            init_normal_(self.position_embeddings.weight, std)
        self.tokentype_embeddings: Optional[nn.Embedding] = None
        if config.num_tokentypes > 0:
            self.tokentype_embeddings = nn.Embedding(config.num_tokentypes, config.hidden_size, dtype=dtype)
            init_normal_(self.tokentype_embeddings.weight, std)

    def forward(
        self, input_ids: Tensor, position_ids: Optional[Tensor], tokentype_ids: Optional[Tensor] = None
    ) -> Tensor:
        """input_ids, position_ids, tokentype_ids: [batch, seq] int -> [batch, seq, hidden]."""
        x = self.word_embeddings(input_ids)
        if self.embedding_layernorm is not None:
            x = self.embedding_layernorm(x)
        if self.position_embeddings is not None:
            if position_ids is None:
                raise ValueError("position_ids are required with learned absolute position embeddings")
            x = x + self.position_embeddings(position_ids)
        if self.tokentype_embeddings is not None:
            if tokentype_ids is None:
                tokentype_ids = torch.zeros_like(input_ids)
            x = x + self.tokentype_embeddings(tokentype_ids)
        if self.fp32_residual:
            x = x.float()
        if self.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, self.tp_group)
            with get_rng_tracker().fork():
                return F.dropout(x, p=self.dropout_p, training=self.training)
        return F.dropout(x, p=self.dropout_p, training=self.training)


class Pooler(nn.Module):
    """BERT's pooler: tanh(dense(h_0)) on the first ([CLS]) token: [batch, seq, h] -> [batch, h]."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.dense = normal_linear(config.hidden_size, config.hidden_size, config)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))


class TransformerLanguageModel(nn.Module):
    """embedding -> encoder (transformer layers + final layernorm) [-> pooler], or one pipeline stage of it.

    Submodule names (`embedding`, `encoder`, `pooler`) are those of Megatron-LM's checkpoints. `stage`
    (default: the whole model) says which layers to build and whether this stage holds the embedding
    (pre_process) and the final layernorm and pooler (post_process). A stage without the embedding takes
    its input from `set_input_tensor` (the previous stage's output, given by the pipeline schedule).
    Every stage draws the initial weights of the whole model up to its last part from the default
    generator, in the whole model's order, and keeps its own parts, so the weights do not depend on the
    pipeline layout; a last stage without the embedding keeps the drawn word embedding for
    `take_drawn_word_embeddings` (its tied copy).

    With sequence parallelism the hidden states come out as this rank's s/p positions, unless
    `gather_sequence_output`: then the sequence is all-gathered for consumers that are duplicated on every
    TP rank (BERT's pooler and heads), whose gradient each rank keeps its own positions of.
    """

    def __init__(
        self,
        config: TransformerConfig,
        parallel: ParallelState,
        causal: bool,
        add_pooler: bool,
        gather_sequence_output: bool = True,
        stage: Optional[StageLayout] = None,
    ) -> None:
        super().__init__()
        check_config(config, parallel)
        self.tp_group = parallel.tp_group
        self.stage = StageLayout.whole(config.num_layers) if stage is None else stage
        pre, post = self.stage.pre_process, self.stage.post_process
        # Under sequence parallelism only the last stage gathers; earlier stages send s/t of the sequence.
        self.gather_sequence_output = (
            post and gather_sequence_output and config.sequence_parallel and parallel.tp_size > 1
        )
        embedding = Embedding(config, parallel)
        self.embedding: Optional[Embedding] = embedding if pre else None
        self.tied_output = not config.untie_embeddings_and_output_weights
        tied_copy = post and not pre and self.tied_output
        self._drawn_word_embeddings = [embedding.word_embeddings] if tied_copy else []
        self.rotary_pos_emb: Optional[RotaryEmbedding] = None
        if config.position_embedding_type == "rope":  # on every stage: each layer rotates its q and k
            self.rotary_pos_emb = RotaryEmbedding(
                config.kv_channels, config.rotary_percent, config.rotary_base
            )
        self.encoder = ParallelTransformer(config, parallel, causal, self.stage.layers, post)
        self.pooler: Optional[Pooler] = Pooler(config) if add_pooler and post else None
        self.output_layer: Optional[ColumnParallelLinear] = None
        if config.untie_embeddings_and_output_weights and post:
            self.output_layer = ColumnParallelLinear(
                config.hidden_size,
                config.padded_vocab_size,
                parallel=parallel,
                bias=False,
                init_std=config.init_method_std,
                params_dtype=config.params_dtype,
            )
        self.input_tensor: Optional[Tensor] = None

    def take_drawn_word_embeddings(self) -> VocabParallelEmbedding:
        """The word embedding a last stage without the embedding drew (equal to the first stage's), once."""
        return self._drawn_word_embeddings.pop()

    def set_input_tensor(self, input_tensor: Optional[Tensor]) -> None:
        """The hidden states [batch, seq, h] from the previous pipeline stage, used by the next forward."""
        self.input_tensor = input_tensor

    def output_weight(self) -> Tensor:
        """This rank's vocabulary slice [V/p, h] of the output layer: output_layer's, or the word embeddings'
        when tied (on the whole model or a stage holding the embedding)."""
        if self.output_layer is not None:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Optional[Tensor],
        allowed: Optional[Tensor],
        tokentype_ids: Optional[Tensor] = None,
        inference_params: Optional[InferenceParams] = None,
    ) -> tuple[Tensor, Optional[Tensor]]:
        """-> (hidden [batch, seq, h] after the final layernorm (before it on a stage without it), pooled
        [batch, h] or None).

        `allowed`: None or a boolean mask broadcastable to [batch, heads, seq, seq], True where a query may
        attend to a key (see megatron.model.transformer). `inference_params`: the KV cache of incremental
        decoding; the input_ids are then the new tokens, at the positions given by position_ids. On a stage
        without the embedding the input is the tensor given to `set_input_tensor`.
        """
        if self.embedding is not None:
            x = self.embedding(input_ids, position_ids, tokentype_ids)
        elif self.input_tensor is None:
            raise RuntimeError(
                "a pipeline stage without the embedding needs set_input_tensor() before forward"
            )
        else:
            x = self.input_tensor
        rotary = None
        if self.rotary_pos_emb is not None:
            if position_ids is None:
                raise ValueError("position_ids are required with rotary position embeddings")
            rotary = self.rotary_pos_emb(position_ids)
        hidden = self.encoder(x, allowed, inference_params, rotary)
        if self.gather_sequence_output:
            hidden = gather_from_sequence_parallel_region(hidden, self.tp_group, grad_is_partial=False)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return hidden, pooled


def word_embeddings_for_head(language_model: TransformerLanguageModel) -> VocabParallelEmbedding:
    """The last stage's copy of the tied word embedding (Megatron's `word_embeddings_for_head`): the word
    embedding the stage drew as the whole model does, so it starts bitwise equal to the first stage's. The
    DP gradient sync (finish_grad_sync) all-reduces the two gradients over the embedding group each step, so
    the copies stay equal.
    It is marked `shared`: the gradient norm counts only the first stage's copy."""
    head = language_model.take_drawn_word_embeddings()
    head.weight.shared = True
    return head


def output_embedding_weight(model: nn.Module) -> Tensor:
    """The output-layer weight of a GPT/BERT last stage: the untied output layer's, its own word
    embeddings when it also holds the embedding, else its `word_embeddings_for_head` copy."""
    language_model = model.language_model
    if language_model.output_layer is not None or language_model.embedding is not None:
        return language_model.output_weight()
    return model.word_embeddings_for_head.weight


def mark_pipeline_tied(model: nn.Module) -> None:
    """Mark the copies of the tied word embedding held by a stage that does not hold both ends: the first
    stage's input embedding and the last stage's `word_embeddings_for_head` (gradients all-reduced over
    the embedding group)."""
    stage = model.language_model.stage
    if not model.language_model.tied_output or (stage.pre_process and stage.post_process):
        return  # an untied output layer, or both ends on this stage: nothing crosses stages
    if stage.pre_process and not stage.post_process:
        model.language_model.embedding.word_embeddings.weight.pipeline_tied = True
    if stage.post_process and not stage.pre_process:
        model.word_embeddings_for_head.weight.pipeline_tied = True
