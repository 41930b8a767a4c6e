"""Flags of the network's shape and numerics, regularisation and initialisation, and the typed
TransformerConfig derived from them."""

from __future__ import annotations

import argparse
from typing import Callable, NoReturn, Optional

from megatron.arguments.distributed import launcher_ranks
from megatron.arguments.llama import validate_llama_args
from megatron.model.config import TransformerConfig

# Attributes taken from a checkpoint's saved args with --use-checkpoint-args: the model's shape and
# numerics, and the tokenizer it was trained with.
CHECKPOINT_MODEL_ARGS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "kv_channels",
    "max_position_embeddings",
    "position_embedding_type",
    "rotary_base",
    "rotary_percent",
    "normalization",
    "swiglu",
    "group_query_attention",
    "num_query_groups",
    "add_bias_linear",
    "untie_embeddings_and_output_weights",
    "embedding_layernorm",
    "apply_residual_connection_post_layernorm",
    "fp32_residual_connection",
    "openai_gelu",
    "bias_gelu_fusion",
    "layernorm_epsilon",
    "make_vocab_size_divisible_by",
    "padded_vocab_size",
    "tokenizer_type",
    "vocab_file",
    "merge_file",
    "tokenizer_model",
    "vocab_size",
    "bert_binary_head",
    "num_tokentypes",
)


def add_network_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("network size")
    g.add_argument("--num-layers", type=int, default=None, help="Number of transformer layers.")
    g.add_argument("--hidden-size", type=int, default=None, help="Transformer hidden size.")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="MLP hidden size (default 4 * hidden).")
    g.add_argument("--num-attention-heads", type=int, default=None, help="Number of attention heads.")
    g.add_argument("--kv-channels", type=int, default=None, help="Per-head size (default hidden / heads).")
    g.add_argument("--seq-length", type=int, default=None, help="Maximum sequence length to process.")
    g.add_argument(
        "--max-position-embeddings", type=int, default=None, help="Position embeddings (default seq-length)."
    )
    g.add_argument(
        "--position-embedding-type",
        choices=["learned_absolute", "rope", "alibi"],
        default="learned_absolute",
        help="Learned absolute position embeddings, rotary (RoPE), or BLOOM's ALiBi attention biases.",
    )
    g.add_argument(
        "--embedding-layernorm", action="store_true", help="BLOOM: layernorm after the word embeddings."
    )
    g.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="Pad the vocabulary to a multiple of this value times the TP size.",
    )
    g.add_argument("--layernorm-epsilon", type=float, default=1e-5, help="Layer norm epsilon.")
    g.add_argument(
        "--apply-residual-connection-post-layernorm",
        action="store_true",
        help="Residual from the layernorm output (original BERT/GPT order) instead of its input.",
    )
    g.add_argument("--openai-gelu", action="store_true", help="GeLU in OpenAI's tanh form.")
    g.add_argument(
        "--no-bias-gelu-fusion",
        action="store_false",
        dest="bias_gelu_fusion",
        help="Exact erf GeLU instead of the fused bias+GeLU tanh form.",
    )
    g.add_argument(
        "--fp32-residual-connection", action="store_true", help="Keep the residual stream in fp32."
    )
    g.add_argument(
        "--bert-no-binary-head",
        action="store_false",
        dest="bert_binary_head",
        help="BERT without the next-sentence binary head.",
    )


def check_model_args(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> None:
    """Model shape (divisible over the TP size) and dropout; fills ffn_hidden_size, kv_channels, max positions."""
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        if getattr(args, flag) is None:
            fail(f"--{flag.replace('_', '-')} is required")
        if getattr(args, flag) <= 0:
            fail(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    tp = args.tensor_model_parallel_size
    if args.hidden_size % args.num_attention_heads != 0 and args.kv_channels is None:
        fail(
            f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
            f"{args.num_attention_heads} (or give --kv-channels)"
        )
    if args.num_attention_heads % tp != 0:
        fail(
            f"--num-attention-heads {args.num_attention_heads} is not divisible by "
            f"--tensor-model-parallel-size {tp}"
        )
    validate_llama_args(args, fail)
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.ffn_hidden_size % tp != 0:
        fail(
            f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}"
        )
    if args.kv_channels is None:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.position_embedding_type == "learned_absolute" and args.seq_length > args.max_position_embeddings:
        fail(
            f"--seq-length {args.seq_length} exceeds --max-position-embeddings {args.max_position_embeddings}"
        )
    for flag in ("attention_dropout", "hidden_dropout"):
        value = getattr(args, flag)
        if not 0.0 <= value < 1.0:
            fail(f"--{flag.replace('_', '-')} must be in [0, 1), got {value}")
    if args.sequence_parallel and tp == 1:
        if launcher_ranks()[0] == 0:
            print("note: --sequence-parallel ignored: it needs --tensor-model-parallel-size > 1", flush=True)
        args.sequence_parallel = False
    if args.sequence_parallel and args.seq_length % tp != 0:
        fail(
            f"--sequence-parallel splits the sequence over the tensor-parallel ranks: --seq-length "
            f"{args.seq_length} is not divisible by --tensor-model-parallel-size {tp}"
        )


def add_regularization_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("regularization")
    g.add_argument("--attention-dropout", type=float, default=0.1, help="Dropout on attention probabilities.")
    g.add_argument("--hidden-dropout", type=float, default=0.1, help="Dropout on hidden states.")
    g.add_argument("--weight-decay", type=float, default=0.01, help="Decoupled weight decay coefficient.")
    g.add_argument("--start-weight-decay", type=float, default=None, help="Initial weight decay.")
    g.add_argument("--end-weight-decay", type=float, default=None, help="Final weight decay.")
    g.add_argument("--weight-decay-incr-style", choices=["constant", "linear", "cosine"], default="constant")
    g.add_argument("--clip-grad", type=float, default=1.0, help="Clip gradients to this global L2 norm.")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)


def add_initialization_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("initialization")
    g.add_argument("--seed", type=int, default=1234, help="Random seed for python, numpy, torch.")
    g.add_argument("--init-method-std", type=float, default=0.02, help="Std of the normal initialisation.")


def transformer_config_from_args(
    args: argparse.Namespace, padded_vocab_size: Optional[int] = None
) -> TransformerConfig:
    """The model's typed config. `padded_vocab_size` (the run's, see megatron.run_state) defaults to
    `args.padded_vocab_size`, which the args saved in a checkpoint carry."""
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        padded_vocab_size=args.padded_vocab_size if padded_vocab_size is None else padded_vocab_size,
        max_position_embeddings=args.max_position_embeddings,
        ffn_hidden_size=args.ffn_hidden_size,
        kv_channels=args.kv_channels,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        layernorm_epsilon=args.layernorm_epsilon,
        apply_residual_connection_post_layernorm=args.apply_residual_connection_post_layernorm,
        fp32_residual_connection=args.fp32_residual_connection,
        openai_gelu=args.openai_gelu,
        bias_gelu_fusion=args.bias_gelu_fusion,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
        rotary_percent=args.rotary_percent,
        normalization=args.normalization,
        swiglu=args.swiglu,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        add_bias_linear=args.add_bias_linear,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        embedding_layernorm=args.embedding_layernorm,
        recompute_granularity=args.recompute_granularity,
        sequence_parallel=args.sequence_parallel,
        params_dtype=args.params_dtype,
    )
