"""The model's configuration: one typed object, built from the parsed arguments and passed explicitly."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TransformerConfig:
    """Shape and numerics of a GPT or BERT model (field names follow Megatron-LM's argument names),
    including the Llama family's RoPE, RMSNorm, SwiGLU, grouped-query attention, untied and bias-free layers.

    `padded_vocab_size` is the tokenizer's vocabulary padded to a multiple of
    `make_vocab_size_divisible_by * tensor_model_parallel_size` (see megatron.tokenizer).
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    padded_vocab_size: int
    max_position_embeddings: int
    ffn_hidden_size: Optional[int] = None  # default 4 * hidden_size
    kv_channels: Optional[int] = None  # default hidden_size // num_attention_heads
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    layernorm_epsilon: float = 1e-5
    apply_residual_connection_post_layernorm: bool = False
    fp32_residual_connection: bool = False
    openai_gelu: bool = False
    bias_gelu_fusion: bool = False  # Megatron's fused bias+GeLU uses the tanh approximation
    position_embedding_type: str = "learned_absolute"  # or "alibi", "rope"
    rotary_base: int = 10000  # RoPE: theta_i = position / rotary_base^(2 i / rotary_dim)
    rotary_percent: float = 1.0  # RoPE rotates the first rotary_percent x kv_channels dims of each head
    normalization: str = "LayerNorm"  # or "RMSNorm"
    swiglu: bool = False  # MLP silu(X A_gate) * (X A_up) B instead of GeLU(X A) B
    num_query_groups: Optional[int] = None  # grouped-query attention: key/value heads (default: all heads)
    add_bias_linear: bool = True  # False: no biases in the attention and MLP linear layers
    untie_embeddings_and_output_weights: bool = False  # own output_layer instead of the word embeddings
    embedding_layernorm: bool = False  # BLOOM's layernorm right after the word embeddings
    num_tokentypes: int = 0  # 2 for BERT
    add_binary_head: bool = True  # BERT's next-sentence head
    recompute_granularity: Optional[str] = None  # None, "full" or "selective"
    params_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads

    @property
    def gelu_tanh(self) -> bool:
        """GeLU in its tanh form (OpenAI's and Megatron's fused bias-GeLU) instead of the exact erf form."""
        return self.openai_gelu or self.bias_gelu_fusion

    @property
    def output_layer_init_std(self) -> float:
        """Std of the output projection of each block: sigma / sqrt(2 * num_layers) (GPT-2's scaled init)."""
        return self.init_method_std / math.sqrt(2.0 * self.num_layers)
