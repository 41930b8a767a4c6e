"""The Llama-family flags (Megatron-LM's names) and their validation: rotary position embeddings, RMSNorm,
SwiGLU, grouped-query attention, an untied output layer and bias-free linear layers.

    --position-embedding-type rope   (old alias --use-rotary-position-embeddings) --rotary-base --rotary-percent
    --normalization {LayerNorm,RMSNorm}   --norm-epsilon (alias of --layernorm-epsilon)
    --swiglu   (--ffn-hidden-size defaults to int(4 h x 2/3 / 64) x 64, as in Megatron-LM)
    --group-query-attention --num-query-groups G
    --untie-embeddings-and-output-weights   --disable-bias-linear

The model builds these through megatron.model.config.TransformerConfig; megatron.model.transformer's
check_llama_config repeats the shape checks for models built without the parser.
"""

from __future__ import annotations

import argparse
from typing import Callable, NoReturn


def add_llama_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Llama family (rotary, RMSNorm, SwiGLU, grouped-query attention)")
    g.add_argument(
        "--use-rotary-position-embeddings",
        action="store_true",
        help="Older Megatron's name for --position-embedding-type rope.",
    )
    g.add_argument("--rotary-base", type=int, default=10000, help="RoPE base theta (default 10000).")
    g.add_argument(
        "--rotary-percent", type=float, default=1.0, help="Fraction of each head's dims that RoPE rotates."
    )
    g.add_argument(
        "--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm", help="Normalisation layer."
    )
    g.add_argument(
        "--norm-epsilon",
        type=float,
        dest="layernorm_epsilon",
        default=argparse.SUPPRESS,
        help="Epsilon of LayerNorm/RMSNorm (newer Megatron's name for --layernorm-epsilon).",
    )
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP: silu(x A_gate) * (x A_up), then B.")
    g.add_argument(
        "--group-query-attention", action="store_true", help="Grouped-query attention (--num-query-groups)."
    )
    g.add_argument(
        "--num-query-groups", type=int, default=None, help="Key/value heads with --group-query-attention."
    )
    g.add_argument(
        "--untie-embeddings-and-output-weights",
        action="store_true",
        help="A separate output layer instead of reusing the word embeddings.",
    )
    g.add_argument(
        "--disable-bias-linear",
        action="store_false",
        dest="add_bias_linear",
        help="No biases in the attention and MLP linear layers.",
    )


def validate_llama_args(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> None:
    """Resolve aliases and defaults (rope, query groups, the SwiGLU ffn size); `fail` (parser.error) on
    heads not divisible by groups, groups not divisible by TP, --rotary-percent outside (0, 1], or an odd
    rotary dimension. Runs before the generic ffn/kv_channels defaults are filled in."""
    if args.use_rotary_position_embeddings:
        args.position_embedding_type = "rope"
    heads, tp = args.num_attention_heads, args.tensor_model_parallel_size
    if args.group_query_attention:
        args.num_query_groups = 1 if args.num_query_groups is None else args.num_query_groups
        groups = args.num_query_groups
        if groups < 1 or heads % groups != 0:
            fail(f"--num-attention-heads {heads} is not divisible by --num-query-groups {groups}")
        if groups % tp != 0:
            fail(f"--num-query-groups {groups} is not divisible by --tensor-model-parallel-size {tp}")
    elif args.num_query_groups is not None:
        fail("--num-query-groups needs --group-query-attention")
    if args.position_embedding_type == "rope":
        if not 0.0 < args.rotary_percent <= 1.0:
            fail(f"--rotary-percent must be in (0, 1], got {args.rotary_percent}")
        head_dim = args.kv_channels or args.hidden_size // heads
        rotary_dim = int(head_dim * args.rotary_percent)
        if rotary_dim <= 0 or rotary_dim % 2 != 0:
            fail(
                f"--position-embedding-type rope needs an even rotary dimension, but the head dimension "
                f"(--kv-channels) {head_dim} x --rotary-percent {args.rotary_percent} = {rotary_dim}"
            )
    elif args.rotary_percent != 1.0 or args.rotary_base != 10000:
        fail("--rotary-percent and --rotary-base need --position-embedding-type rope")
    if args.swiglu and args.ffn_hidden_size is None:
        # Megatron-LM: two input projections, so 2/3 of 4h keeps the parameter count; a multiple of 64.
        args.ffn_hidden_size = int((4 * args.hidden_size * 2 / 3) / 64) * 64
        if args.ffn_hidden_size == 0:
            fail(f"--swiglu with --hidden-size {args.hidden_size}: give --ffn-hidden-size explicitly")


def flops_shape(args: argparse.Namespace) -> dict:
    """The layer shape that megatron.model.utils.model_flops / hardware_flops take as keywords."""
    return dict(
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        kv_channels=args.kv_channels,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        swiglu=args.swiglu,
    )
