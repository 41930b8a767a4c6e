"""The transformer stack with intra-layer tensor parallelism (Shoeybi et al. 2019, "Megatron-LM", section 3).

Activations are [batch, seq, hidden] throughout (Megatron-LM uses [seq, batch, hidden] to suit its fused
kernels; the maths is the same and batch-first reads more naturally). With p tensor-parallel (TP) ranks:

    MLP:        Y = GeLU(X A) B         A = [A_1 .. A_p] split by columns (ColumnParallelLinear h -> ffn),
                                        B = [B_1; ..; B_p] split by rows (RowParallelLinear ffn -> h),
                                        rank r computes GeLU(X A_r) B_r, and the sum over ranks is one
                                        all-reduce in forward (g); the input X enters through f (identity
                                        forward, all-reduce backward).
    Attention:  QKV in ONE ColumnParallelLinear h -> 3 * heads * head_dim whose output rows are ordered
                [heads, 3, head_dim], so rank r's contiguous row slice holds whole heads: the heads
                r * heads/p .. (r + 1) * heads/p - 1 with their q, k and v. Each rank attends with its own
                heads, and the output projection is a RowParallelLinear (heads * head_dim -> h): again one
                all-reduce forward (g) and one backward (f).

Llama-family variants keep this structure: SwiGLU's gate and up projections are one column-parallel layer
whose shard on rank r is [gate_r; up_r]; grouped-query attention orders the QKV rows per query group, and
the G groups (not the heads) are split over ranks; RoPE rotates each rank's queries and keys locally;
RMSNorm replaces LayerNorm where --normalization RMSNorm.

So a layer does exactly two all-reduces in forward and two in backward (with sequence parallelism, two
all-gathers and two reduce-scatters each way instead, plus two all-gathers in backward that re-gather the
column-parallel GEMMs' inputs: see "Sequence parallelism" below). Layernorm, hidden dropout and the
residual additions are duplicated on every TP rank (they see identical inputs and use the same RNG
stream); attention dropout acts on this rank's heads only, so it draws from the TP-rank-specific stream of
`get_rng_tracker().fork()`.

Sequence parallelism (config.sequence_parallel, TP > 1; Korthikanti et al. 2022): between the TP regions
each rank holds x[:, s/p positions] only, so layernorms, hidden dropout and residual additions work on
s/p of the sequence; the column-parallel GEMMs all-gather the sequence (and again in backward, for the
weight gradient, so that they keep only s/p positions of their input) and the row-parallel ones
reduce-scatter it (megatron.parallel.layers). Hidden dropout then acts on positions that differ per rank,
so it draws from the TP-rank-specific stream, like attention dropout. The parameters used on s/p of the
sequence while duplicated over TP (layernorms, row-parallel biases) are marked `sequence_parallel`: each
rank's gradient is a partial sum over its positions, completed by an all-reduce over TP.

Attention masks are passed as `allowed`: None, or a boolean tensor broadcastable to [batch, heads, seq, seq]
that is True where a query may attend to a key (torch's scaled_dot_product_attention convention). Causality
is a property of the module (GPT: causal, BERT: not) and is applied on top of `allowed`.

Incremental decoding (text generation) passes an `InferenceParams`, the KV cache: each layer appends the
keys and values of the new tokens to its cache and attends with the new queries over all cached positions,
so generating token t costs one forward of one token instead of a forward of all t tokens. The new tokens
are the last positions: with `offset` tokens cached and `s` new ones, query i sits at position offset + i
and key j at position j (j < offset + s); causality and ALiBi use these positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.model.config import TransformerConfig
from megatron.model.norms import RMSNorm
from megatron.model.rotary import apply_rotary_pos_emb, rotary_dim
from megatron.model.swiglu import swiglu
from megatron.model.utils import alibi_slopes, gelu
from megatron.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.parallel.random import checkpoint, get_rng_tracker
from megatron.parallel.state import ParallelState

RECOMPUTE_GRANULARITIES = (None, "full", "selective")
POSITION_EMBEDDING_TYPES = ("learned_absolute", "alibi", "rope")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")


def check_config(config: TransformerConfig, parallel: ParallelState) -> None:
    """Raise ValueError, naming the Megatron flag, for what the model cannot build: sizes not divisible by
    the TP size, an unknown recompute granularity or position embedding type."""
    tp = parallel.tp_size
    if config.num_attention_heads % tp != 0:
        raise ValueError(
            f"--num-attention-heads ({config.num_attention_heads}) must be divisible by "
            f"--tensor-model-parallel-size ({tp})"
        )
    if config.ffn_hidden_size % tp != 0:
        raise ValueError(
            f"--ffn-hidden-size ({config.ffn_hidden_size}) must be divisible by --tensor-model-parallel-size ({tp})"
        )
    if config.padded_vocab_size % tp != 0:
        raise ValueError(
            f"padded vocabulary size ({config.padded_vocab_size}) must be divisible by --tensor-model-parallel-size ({tp})"
        )
    if config.recompute_granularity not in RECOMPUTE_GRANULARITIES:
        raise ValueError(
            f"--recompute-granularity must be 'full' or 'selective', got {config.recompute_granularity!r}"
        )
    if config.position_embedding_type not in POSITION_EMBEDDING_TYPES:
        raise ValueError(
            f"--position-embedding-type must be one of {POSITION_EMBEDDING_TYPES}, got {config.position_embedding_type!r}"
        )
    check_llama_config(config, parallel)


def check_llama_config(config: TransformerConfig, parallel: ParallelState) -> None:
    """ValueError, naming the flag, for grouped-query attention, RoPE or normalisation settings that
    cannot be built: heads not divisible by groups, groups not divisible by TP, an odd or empty rotary
    dimension, --rotary-percent outside (0, 1], an unknown --normalization."""
    heads, groups, tp = config.num_attention_heads, config.num_query_groups, parallel.tp_size
    if groups < 1 or heads % groups != 0:
        raise ValueError(
            f"--num-attention-heads ({heads}) must be divisible by --num-query-groups ({groups})"
        )
    if groups % tp != 0:
        raise ValueError(
            f"--num-query-groups ({groups}) must be divisible by --tensor-model-parallel-size ({tp})"
        )
    if config.normalization not in NORMALIZATIONS:
        raise ValueError(f"--normalization must be one of {NORMALIZATIONS}, got {config.normalization!r}")
    if config.position_embedding_type != "rope":
        return
    if not 0.0 < config.rotary_percent <= 1.0:
        raise ValueError(f"--rotary-percent must be in (0, 1], got {config.rotary_percent}")
    dim = rotary_dim(config.kv_channels, config.rotary_percent)
    if dim <= 0 or dim % 2 != 0:
        raise ValueError(
            f"rotary position embeddings need an even rotary dimension, but head dim (--kv-channels) "
            f"{config.kv_channels} x --rotary-percent {config.rotary_percent} = {dim}"
        )


def build_norm(config: TransformerConfig) -> nn.Module:
    """LayerNorm or RMSNorm (--normalization) over the hidden size, eps --norm-epsilon."""
    norm = RMSNorm if config.normalization == "RMSNorm" else LayerNorm
    return norm(config.hidden_size, eps=config.layernorm_epsilon, dtype=config.params_dtype)


@dataclass
class InferenceParams:
    """The KV cache of incremental decoding (Megatron-LM's InferenceParams).

    Layer n keeps `key_value_memory_dict[n]` = (keys, values), each [max_batch_size, local_groups,
    max_sequence_length, head_dim], allocated on first use in the dtype and device of the keys.
    `sequence_len_offset` is the number of positions already cached. A forward pass given this object
    processes s new tokens at positions sequence_len_offset .. sequence_len_offset + s - 1 (the caller passes
    those position ids), writes their keys and values there in every layer, and then advances
    `sequence_len_offset` by s. Inference only: nothing here is differentiated.
    """

    max_batch_size: int
    max_sequence_length: int
    sequence_len_offset: int = 0
    key_value_memory_dict: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)

    def append(self, layer_number: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Store key, value [batch, local_groups, s, head_dim] of layer `layer_number` at the positions
        offset .. offset + s - 1; return the layer's keys and values of positions 0 .. offset + s - 1."""
        batch, heads, seq, head_dim = key.shape
        end = self.sequence_len_offset + seq
        if end > self.max_sequence_length:
            raise ValueError(
                f"KV cache holds {self.max_sequence_length} positions; {self.sequence_len_offset} cached + "
                f"{seq} new tokens do not fit"
            )
        if batch > self.max_batch_size:
            raise ValueError(
                f"batch of {batch} is larger than the KV cache's max_batch_size {self.max_batch_size}"
            )
        if layer_number not in self.key_value_memory_dict:
            shape = (self.max_batch_size, heads, self.max_sequence_length, head_dim)
            self.key_value_memory_dict[layer_number] = (
                torch.empty(shape, dtype=key.dtype, device=key.device),
                torch.empty(shape, dtype=value.dtype, device=value.device),
            )
        keys, values = self.key_value_memory_dict[layer_number]
        keys[:batch, :, self.sequence_len_offset : end] = key
        values[:batch, :, self.sequence_len_offset : end] = value
        return keys[:batch, :, :end], values[:batch, :, :end]


class LayerNorm(nn.LayerNorm):
    """LayerNorm y = (x - mean) / sqrt(var + eps) * weight + bias over the last dimension, computed in fp32
    and returned in the dtype of the weight, so an fp32 residual stream can feed bf16/fp16 layers."""

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(self.weight.dtype)


class CoreAttention(nn.Module):
    """softmax(Q K^T / sqrt(head_dim) + bias, masked) V for this rank's heads, with dropout on the
    probabilities drawn from the TP-rank-specific RNG stream.

    With ALiBi (BLOOM), bias[h, i, j] = -m_h |i - j| with m_h the slope of global head h; under the causal
    mask this equals BLOOM's m_h * j up to a per-row constant, which softmax ignores. This rank keeps the
    slopes of its own heads.
    """

    def __init__(self, config: TransformerConfig, parallel: ParallelState, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.dropout_p = config.attention_dropout
        self.alibi_slopes: Optional[Tensor]
        if config.position_embedding_type == "alibi":
            local_heads = config.num_attention_heads // parallel.tp_size
            first = parallel.tp_rank * local_heads
            slopes = alibi_slopes(config.num_attention_heads)[first : first + local_heads]
            self.register_buffer("alibi_slopes", slopes, persistent=False)
        else:
            self.alibi_slopes = None

    def _sdpa_mask(self, q: Tensor, k: Tensor, allowed: Optional[Tensor]) -> tuple[Optional[Tensor], bool]:
        """(attn_mask, is_causal) for scaled_dot_product_attention: a boolean mask (True = attend), an
        additive float bias (ALiBi, -inf where not allowed), or None with is_causal for plain causal.

        The sq queries are the last sq of the sk key positions (sq < sk when earlier keys come from a KV
        cache): query i is at position sk - sq + i."""
        sq, sk = q.size(2), k.size(2)
        if self.causal and allowed is None and self.alibi_slopes is None:
            if sq == sk:
                return None, True
            if sq == 1:  # one new token sees every cached position
                return None, False
        query_positions = torch.arange(sk - sq, sk, device=q.device)
        key_positions = torch.arange(sk, device=q.device)
        if self.causal:
            past = key_positions[None, :] <= query_positions[:, None]  # [sq, sk]
            allowed = past if allowed is None else allowed & past
        if self.alibi_slopes is None:
            return allowed, False
        distance = (query_positions[:, None] - key_positions[None, :]).abs().to(torch.float32)
        bias = (-self.alibi_slopes[:, None, None] * distance).to(q.dtype)  # [local_heads, sq, sk]
        return (bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))), False

    def forward(self, q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor]) -> Tensor:
        """q: [batch, local_heads, sq, head_dim], k, v: [batch, local_groups, sk, head_dim] with sk >= sq
        (the queries are the last sq key positions) -> context [batch, local_heads, sq, head_dim].

        With grouped-query attention (local_groups < local_heads) query head i uses key/value head
        i // (local_heads / local_groups): the query heads of a group are consecutive."""
        mask, is_causal = self._sdpa_mask(q, k, allowed)
        gqa = k.size(1) != q.size(1)
        if not (self.training and self.dropout_p > 0):  # no randomness: no RNG state needed (inference)
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa
            )
        with get_rng_tracker().fork():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=self.dropout_p, is_causal=is_causal, enable_gqa=gqa
            )


class ParallelAttention(nn.Module):
    """Self-attention: QKV column-parallel (whole heads per rank), core attention, output row-parallel.

    With grouped-query attention (G = num_query_groups < heads) the n/G query heads of a group share one
    key and one value head, and the fused QKV rows are ordered per group, [G, n/G + 2, head_dim]: the
    group's query heads, then its key head, then its value head (Megatron's layout; G = n is the
    [heads, 3, head_dim] order of multi-head attention). G is divisible by the TP size, so a rank's
    contiguous row slice holds G/p whole groups. With RoPE, queries and keys are rotated before the keys
    enter the KV cache.
    """

    def __init__(
        self, config: TransformerConfig, parallel: ParallelState, causal: bool, layer_number: int = 0
    ) -> None:
        super().__init__()
        self.layer_number = layer_number  # this layer's entry in a KV cache
        self.local_heads = config.num_attention_heads // parallel.tp_size
        self.local_groups = config.num_query_groups // parallel.tp_size
        self.head_dim = config.kv_channels
        projection_size = config.num_attention_heads * config.kv_channels
        self.selective_recompute = config.recompute_granularity == "selective"
        self.query_key_value = ColumnParallelLinear(
            config.hidden_size,
            projection_size + 2 * config.num_query_groups * config.kv_channels,
            parallel=parallel,
            bias=config.add_bias_linear,
            gather_output=False,
            init_std=config.init_method_std,
            params_dtype=config.params_dtype,
            sequence_parallel=config.sequence_parallel,
        )
        self.core_attention = CoreAttention(config, parallel, causal)
        self.dense = RowParallelLinear(
            projection_size,
            config.hidden_size,
            parallel=parallel,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            init_std=config.output_layer_init_std,
            params_dtype=config.params_dtype,
            sequence_parallel=config.sequence_parallel,
        )

    def forward(
        self,
        x: Tensor,
        allowed: Optional[Tensor],
        inference_params: Optional[InferenceParams] = None,
        rotary_pos_emb: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Tensor:
        """x: [batch, seq, hidden] (the same on every TP rank) -> [batch, seq, hidden] (summed over ranks).

        With `inference_params` the keys and values of x join the cache and the queries of x attend over
        every cached position. `rotary_pos_emb`: RoPE's (cos, sin) of x's positions (megatron.model.rotary)."""
        per_group = self.local_heads // self.local_groups
        qkv, _ = self.query_key_value(x)  # [batch, seq, local_groups * (per_group + 2) * head_dim], whole seq
        batch, seq, _ = qkv.shape
        qkv = qkv.view(batch, seq, self.local_groups, per_group + 2, self.head_dim)
        q = qkv[:, :, :, :per_group].reshape(batch, seq, self.local_heads, self.head_dim).transpose(1, 2)
        k, v = (qkv[:, :, :, per_group + i].transpose(1, 2) for i in (0, 1))  # [batch, local_groups, seq, d]
        if rotary_pos_emb is not None:
            q, k = apply_rotary_pos_emb(q, rotary_pos_emb), apply_rotary_pos_emb(k, rotary_pos_emb)
        if inference_params is not None:
            k, v = inference_params.append(self.layer_number, k, v)  # [batch, local_groups, cached, head_dim]
        if self.selective_recompute and torch.is_grad_enabled():
            context = checkpoint(self.core_attention, q, k, v, allowed)
        else:
            context = self.core_attention(q, k, v, allowed)
        context = context.transpose(1, 2).reshape(batch, seq, self.local_heads * self.head_dim)
        output, _ = self.dense(context)
        return output


class ParallelMLP(nn.Module):
    """h -> ffn (column-parallel), GeLU, ffn -> h (row-parallel): Y = GeLU(X A) B.

    SwiGLU: Y = (silu(X A_gate) * X A_up) B, with A_gate and A_up in one column-parallel layer h -> 2 ffn
    whose rows on rank r are [its gate slice; its up slice] (Megatron's layout, `stride` 2), so each rank
    applies the gate to its own up columns and the row-parallel B_r needs nothing from other ranks.
    """

    def __init__(self, config: TransformerConfig, parallel: ParallelState) -> None:
        super().__init__()
        self.gelu_tanh = config.gelu_tanh
        self.swiglu = config.swiglu
        self.dense_h_to_4h = ColumnParallelLinear(
            config.hidden_size,
            2 * config.ffn_hidden_size if config.swiglu else config.ffn_hidden_size,
            parallel=parallel,
            bias=config.add_bias_linear,
            stride=2 if config.swiglu else 1,
            gather_output=False,
            init_std=config.init_method_std,
            params_dtype=config.params_dtype,
            sequence_parallel=config.sequence_parallel,
        )
        self.dense_4h_to_h = RowParallelLinear(
            config.ffn_hidden_size,
            config.hidden_size,
            parallel=parallel,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            init_std=config.output_layer_init_std,
            params_dtype=config.params_dtype,
            sequence_parallel=config.sequence_parallel,
        )

    def forward(self, x: Tensor) -> Tensor:
        """x: [batch, seq, hidden] -> [batch, seq, hidden]."""
        intermediate, _ = self.dense_h_to_4h(x)
        if self.swiglu:
            output, _ = self.dense_4h_to_h(swiglu(intermediate))
        else:
            output, _ = self.dense_4h_to_h(gelu(intermediate, self.gelu_tanh))
        return output


class ParallelTransformerLayer(nn.Module):
    """One transformer layer, pre-LN:

        a = x + dropout(attention(LN1(x)));   y = a + dropout(mlp(LN2(a)))

    With `apply_residual_connection_post_layernorm` the residual branch starts from the layernorm output
    instead (a = LN1(x) + dropout(attention(LN1(x))), likewise for the MLP): the original BERT order as
    Megatron-LM implements it. With `fp32_residual_connection` the residual sums are kept in fp32.
    """

    def __init__(
        self, config: TransformerConfig, parallel: ParallelState, causal: bool, layer_number: int = 0
    ) -> None:
        super().__init__()
        self.hidden_dropout = config.hidden_dropout
        self.sequence_parallel = config.sequence_parallel and parallel.tp_size > 1
        self.residual_from_layernorm = config.apply_residual_connection_post_layernorm
        self.fp32_residual = config.fp32_residual_connection
        self.input_layernorm = build_norm(config)
        self.self_attention = ParallelAttention(config, parallel, causal, layer_number)
        self.post_attention_layernorm = build_norm(config)
        self.mlp = ParallelMLP(config, parallel)

    def _residual_add(self, residual: Tensor, branch: Tensor) -> Tensor:
        """residual + dropout(branch); the dropout mask is the same on all TP ranks (default RNG stream),
        or, with sequence parallelism, drawn per rank for its own positions (TP-rank stream)."""
        if self.fp32_residual:
            residual = residual.float()
        if self.sequence_parallel and self.training and self.hidden_dropout > 0:
            with get_rng_tracker().fork():
                return residual + F.dropout(branch, p=self.hidden_dropout, training=True)
        return residual + F.dropout(branch, p=self.hidden_dropout, training=self.training)

    def forward(
        self,
        x: Tensor,
        allowed: Optional[Tensor],
        inference_params: Optional[InferenceParams] = None,
        rotary_pos_emb: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Tensor:
        """x: [batch, seq, hidden] -> [batch, seq, hidden]."""
        normed = self.input_layernorm(x)
        x = self._residual_add(
            normed if self.residual_from_layernorm else x,
            self.self_attention(normed, allowed, inference_params, rotary_pos_emb),
        )
        normed = self.post_attention_layernorm(x)
        return self._residual_add(normed if self.residual_from_layernorm else x, self.mlp(normed))


class ParallelTransformer(nn.Module):
    """Transformer layers followed by the final layernorm.

    `layers` are the global numbers of the layers to keep (all of config.num_layers by default; a pipeline
    stage keeps its own block, stored as layers.0, layers.1, .. as Megatron numbers them in a stage's
    checkpoint). The layers before the block are built too and dropped: their initial weights are drawn
    from the default generator exactly as the whole model draws them, so the block gets the weights it
    has in the whole model whatever the pipeline layout. `final_layernorm` is False on all but the last
    pipeline stage.

    recompute_granularity 'full' recomputes each whole layer in backward (only its input is kept);
    'selective' recomputes only the attention core softmax(QK^T)V inside each layer (its s^2 activations
    are the large ones). The RNG states, including the TP-region tracker, are replayed, so dropout masks
    are identical in the recomputation.
    """

    def __init__(
        self,
        config: TransformerConfig,
        parallel: ParallelState,
        causal: bool,
        layers: Optional[range] = None,
        final_layernorm: bool = True,
    ) -> None:
        super().__init__()
        self.full_recompute = config.recompute_granularity == "full"
        layers = range(config.num_layers) if layers is None else layers
        kept = []
        for n in range(layers.stop):
            layer = ParallelTransformerLayer(config, parallel, causal, layer_number=n)
            if n in layers:
                kept.append(layer)
        self.layers = nn.ModuleList(kept)
        self.final_layernorm: Optional[nn.Module] = build_norm(config) if final_layernorm else None
        if config.sequence_parallel and parallel.tp_size > 1:
            for param in self.parameters():  # duplicated over TP, applied to s/p of the sequence
                if not getattr(param, "tensor_model_parallel", False):
                    param.sequence_parallel = True

    def forward(
        self,
        x: Tensor,
        allowed: Optional[Tensor],
        inference_params: Optional[InferenceParams] = None,
        rotary_pos_emb: Optional[tuple[Tensor, Tensor]] = None,
    ) -> Tensor:
        """x: [batch, seq, hidden] (embeddings, or the previous stage's output) -> [batch, seq, hidden]
        (after the final layernorm when this block has it).

        With `inference_params` (the KV cache) every layer appends the keys and values of the seq new
        tokens, and the cache's sequence_len_offset then advances by seq (each pipeline stage keeps its own
        cache). `rotary_pos_emb`: RoPE's (cos, sin) of the positions of x, or None."""
        for layer in self.layers:
            if inference_params is not None:
                x = layer(x, allowed, inference_params, rotary_pos_emb)
            elif self.full_recompute and torch.is_grad_enabled():
                x = checkpoint(layer, x, allowed, None, rotary_pos_emb)
            else:
                x = layer(x, allowed, None, rotary_pos_emb)
        if inference_params is not None:
            inference_params.sequence_len_offset += x.size(1)
        return x if self.final_layernorm is None else self.final_layernorm(x)
