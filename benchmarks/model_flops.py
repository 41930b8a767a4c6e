"""Parameter count and FLOPs per iteration of a GPT model, from Megatron-LM's command-line flags.

    python benchmarks/model_flops.py --num-layers 96 --hidden-size 12288 --num-attention-heads 96 \\
        --seq-length 2048 --vocab-size 50257 --global-batch-size 1536 --recompute-granularity full

    python benchmarks/model_flops.py --num-layers 32 --hidden-size 4096 --num-attention-heads 32 \
        --group-query-attention --num-query-groups 8 --swiglu --ffn-hidden-size 14336 \
        --untie-embeddings-and-output-weights --position-embedding-type rope --normalization RMSNorm \
        --disable-bias-linear --seq-length 8192 --vocab-size 128256 --global-batch-size 1   # Llama-3-8B

The parameter count comes from a real GPTModel built on the meta device (no memory is allocated). FLOPs
use Megatron's formula (megatron.model.utils.model_flops / hardware_flops) with the MLP width, SwiGLU's
three matrices and grouped-query attention's smaller K/V.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Optional

import torch

from megatron.model import GPTModel, TransformerConfig
from megatron.model.utils import hardware_flops, model_flops
from megatron.parallel.state import single_process_state


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, required=True)
    parser.add_argument("--hidden-size", type=int, required=True)
    parser.add_argument("--num-attention-heads", type=int, required=True)
    parser.add_argument("--seq-length", type=int, required=True)
    parser.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    parser.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 h")
    parser.add_argument("--kv-channels", type=int, default=None, help="default: h / heads")
    parser.add_argument("--swiglu", action="store_true")
    parser.add_argument("--group-query-attention", action="store_true")
    parser.add_argument("--num-query-groups", type=int, default=None)
    parser.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    parser.add_argument(
        "--position-embedding-type", choices=("learned_absolute", "rope"), default="learned_absolute"
    )
    parser.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    parser.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    vocab = parser.add_mutually_exclusive_group(required=True)
    vocab.add_argument("--padded-vocab-size", type=int, help="vocabulary size after padding")
    vocab.add_argument("--vocab-size", type=int, help="tokenizer vocabulary size, padded as Megatron does")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    parser.add_argument(
        "--tensor-model-parallel-size", type=int, default=1, help="only used to pad the vocabulary"
    )
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--global-batch-size", type=int, default=None, help="default: --micro-batch-size")
    parser.add_argument(
        "--recompute-activations",
        action="store_true",
        help="selective recompute (Megatron's meaning of the flag)",
    )
    parser.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    args = parser.parse_args(argv)
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.num_query_groups is not None and not args.group_query_attention:
        parser.error("--num-query-groups needs --group-query-attention")
    if args.group_query_attention:
        args.num_query_groups = args.num_query_groups or 1
        if args.num_attention_heads % args.num_query_groups != 0:
            parser.error(
                f"--num-attention-heads {args.num_attention_heads} is not divisible by --num-query-groups {args.num_query_groups}"
            )
    if args.kv_channels is None and args.hidden_size % args.num_attention_heads != 0:
        parser.error(
            f"--hidden-size ({args.hidden_size}) must be divisible by --num-attention-heads ({args.num_attention_heads})"
        )
    if args.recompute_activations and args.recompute_granularity == "full":
        parser.error("--recompute-activations (selective) conflicts with --recompute-granularity full")
    if args.recompute_activations:
        args.recompute_granularity = "selective"
    if args.vocab_size is not None:
        multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
        args.padded_vocab_size = math.ceil(args.vocab_size / multiple) * multiple
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.kv_channels is None:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    return args


def flops_shape(args: argparse.Namespace) -> dict:
    """model_flops's keyword arguments for these flags."""
    return dict(
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        kv_channels=args.kv_channels,
        num_query_groups=args.num_query_groups,
        swiglu=args.swiglu,
    )


def count_parameters(args: argparse.Namespace) -> tuple[int, int]:
    """(total, embedding) parameter counts of the GPT model, built on the meta device."""
    config = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        padded_vocab_size=args.padded_vocab_size,
        max_position_embeddings=args.max_position_embeddings,
        ffn_hidden_size=args.ffn_hidden_size,
        kv_channels=args.kv_channels,
        swiglu=args.swiglu,
        num_query_groups=args.num_query_groups,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        normalization=args.normalization,
        add_bias_linear=args.add_bias_linear,
    )
    with torch.device("meta"):
        model = GPTModel(config, single_process_state())
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(p.numel() for p in model.language_model.embedding.parameters())
    return total, embedding


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    b, s, n_layers, h, v = (
        args.global_batch_size,
        args.seq_length,
        args.num_layers,
        args.hidden_size,
        args.padded_vocab_size,
    )
    total, embedding = count_parameters(args)
    tokens = b * s
    flops = model_flops(b, s, n_layers, h, v, **flops_shape(args))
    full = hardware_flops(b, s, n_layers, h, v, "full", **flops_shape(args))
    print(
        f"model: L={n_layers} h={h} heads={args.num_attention_heads} s={s} V={v} (padded), batch={b} sequences"
    )
    print(
        f"parameters:                              {total:,} ({total / 1e9:.3f} B; embeddings {embedding:,})"
    )
    print(
        f"model FLOPs / iteration (12 B s L h^2 ((1 + G/n + s/h) nd/h + f/h (x 3/2 SwiGLU) + V/2Lh)):  {flops:.4e}"
    )
    print(f"model FLOPs / token:                     {flops / tokens:.4e}")
    print(f"hardware FLOPs / iteration, full recompute (+ one forward of every layer):  {full:.4e}")
    print(f"hardware FLOPs / token, full recompute:  {full / tokens:.4e}")
    if args.recompute_granularity == "selective":
        selective = hardware_flops(b, s, n_layers, h, v, "selective", **flops_shape(args))
        print(f"hardware FLOPs / iteration, selective recompute:  {selective:.4e}")


if __name__ == "__main__":
    main(sys.argv[1:])
