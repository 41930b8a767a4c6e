"""A trained GPT for inference: model and tokenizer settings from the checkpoint, weights from its shards.

The tools (tools/generate.py, tools/run_text_generation_server.py) take only --load and a few run flags
(`add_inference_args`). `inference_args` starts from the default of every Megatron flag, copies the
checkpoint's model and tokenizer arguments (megatron.arguments.CHECKPOINT_MODEL_ARGS and the parameter
dtype) over them, then applies the tokenizer-file overrides given on the command line (for a checkpoint
whose stored --vocab-file/--merge-file/--tokenizer-model paths have moved). Dropout is off.

The tensor- and pipeline-parallel sizes are the checkpoint's (reshard with tools/checkpoint/reshard.py
to change them); the world size may be a multiple of TP x PP (data-parallel replicas that generate the
same text). Under PP each rank builds its stage, wrapped in PipelinedGPT so that it returns the logits.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch
from torch import nn

from megatron.arguments import (
    CHECKPOINT_MODEL_ARGS,
    build_parser,
    transformer_config_from_args,
    world_size_from_env,
)
from megatron.checkpointing import CheckpointError, load_args_from_checkpoint, load_checkpoint
from megatron.initialize import initialize_megatron
from megatron.model import GPTModel, TransformerConfig
from megatron.parallel.pipeline_layout import stage_layouts
from megatron.parallel.state import ParallelState
from megatron.text_generation.pipelined import PipelinedGPT
from megatron.tokenizer import AbstractTokenizer, TokenizerConfigError, build_tokenizer

TOKENIZER_FILE_FLAGS = ("vocab_file", "merge_file", "tokenizer_model")


def add_inference_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--load, the tokenizer-file overrides, --tensor-model-parallel-size, --seed and the distributed flags."""
    g = parser.add_argument_group("model")
    g.add_argument(
        "--load", required=True, help="Checkpoint folder (with latest_checkpointed_iteration.txt)."
    )
    g.add_argument("--vocab-file", default=None, help="Override the checkpoint's vocabulary file path.")
    g.add_argument("--merge-file", default=None, help="Override the checkpoint's BPE merges file path.")
    g.add_argument(
        "--tokenizer-model", default=None, help="Override the checkpoint's SentencePiece/HF tokenizer path."
    )
    g.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="Must equal the checkpoint's; launch with torchrun --nproc_per_node N for N > 1.",
    )
    g.add_argument("--seed", type=int, default=1234, help="Seed of the random number generators.")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None)
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    return parser


def inference_args(cli: argparse.Namespace) -> argparse.Namespace:
    """The full Megatron args for building the model of the checkpoint in `cli.load` (module docstring).

    Raises CheckpointError when there is no checkpoint, or its TP size differs from the requested one or
    does not divide the world size.
    """
    saved = load_args_from_checkpoint(cli.load)
    args = build_parser().parse_args([])
    for name in (*CHECKPOINT_MODEL_ARGS, "seq_length", "fp16", "bf16", "params_dtype"):
        if hasattr(saved, name):
            setattr(args, name, getattr(saved, name))
    for name in TOKENIZER_FILE_FLAGS:
        if getattr(cli, name) is not None:
            setattr(args, name, getattr(cli, name))
    if getattr(saved, "padded_vocab_size", None) is None:
        raise CheckpointError(f"the args saved in {cli.load} have no padded_vocab_size")
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.kv_channels is None:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if getattr(args, "params_dtype", None) is None:
        args.params_dtype = torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32
    args.hidden_dropout = args.attention_dropout = 0.0

    saved_tp = getattr(saved, "tensor_model_parallel_size", 1)
    if cli.tensor_model_parallel_size != saved_tp:
        raise CheckpointError(
            f"{cli.load} was saved with tensor-model-parallel size {saved_tp} but "
            f"--tensor-model-parallel-size is {cli.tensor_model_parallel_size}; run with "
            f"--tensor-model-parallel-size {saved_tp} (torchrun --nproc_per_node {saved_tp}) or reshard the "
            "checkpoint with tools/checkpoint/reshard.py"
        )
    saved_pp = getattr(saved, "pipeline_model_parallel_size", 1)
    if (getattr(saved, "virtual_pipeline_model_parallel_size", None) or 1) > 1:
        raise CheckpointError(
            f"{cli.load} holds interleaved (virtual) pipeline stages; convert it for generation with "
            "tools/checkpoint/reshard.py (its output has one chunk per stage)"
        )
    args.world_size = world_size_from_env()
    if args.world_size % (saved_tp * saved_pp) != 0:
        raise CheckpointError(
            f"the world size {args.world_size} is not a multiple of tensor-parallel {saved_tp} x pipeline-parallel "
            f"{saved_pp}, the checkpoint's layout; launch with torchrun --nproc_per_node {saved_tp * saved_pp}"
        )
    args.load = cli.load
    args.tensor_model_parallel_size = saved_tp
    args.pipeline_model_parallel_size = saved_pp
    for name in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
        setattr(args, name, getattr(saved, name, None))
    args.seed = cli.seed
    args.distributed_backend = cli.distributed_backend
    args.distributed_timeout_minutes = cli.distributed_timeout_minutes
    return args


def build_inference_model(
    config: TransformerConfig, args: argparse.Namespace, parallel: ParallelState
) -> nn.Module:
    """The GPTModel with full-vocabulary logits, or under PP this rank's stage of it in a PipelinedGPT
    (which returns the same logits on every stage); load weights into `inference_stage(model)`."""
    if parallel.pp_size == 1:
        return GPTModel(config, parallel, parallel_output=False)
    layout = stage_layouts(
        args.num_layers,
        parallel.pp_size,
        first=getattr(args, "decoder_first_pipeline_num_layers", None),
        last=getattr(args, "decoder_last_pipeline_num_layers", None),
    )[parallel.pp_rank][0]
    stage = GPTModel(config, parallel, parallel_output=False, stage=layout)
    positions = args.max_position_embeddings if args.position_embedding_type == "learned_absolute" else None
    return PipelinedGPT(stage, parallel, args.hidden_size, config.padded_vocab_size, positions)


def inference_stage(model: nn.Module) -> nn.Module:
    """The module whose state dict a checkpoint holds: the stage inside a PipelinedGPT, else the model."""
    return model.stage_model if isinstance(model, PipelinedGPT) else model


def load_model_for_inference(
    args: argparse.Namespace,
) -> tuple[GPTModel, AbstractTokenizer, ParallelState]:
    """Initialise torch.distributed (under torchrun), build the tokenizer and the GPTModel of `args` (from
    `inference_args`) with full-vocabulary logits, load the weights, and return (model in eval mode,
    tokenizer, parallel state). Loading messages go to stderr, so stdout carries only results.

    Raises TokenizerConfigError (a tokenizer file is missing: give the override flag) or CheckpointError.
    """
    tokenizer = build_tokenizer(args)
    if tokenizer.vocab_size > args.padded_vocab_size:
        raise TokenizerConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the checkpoint's embedding only "
            f"{args.padded_vocab_size} rows: is --vocab-file the one the model was trained with?"
        )
    parallel = initialize_megatron(args)
    model = build_inference_model(transformer_config_from_args(args), args, parallel)
    model = model.to(dtype=args.params_dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    with contextlib.redirect_stdout(sys.stderr):
        load_checkpoint(
            inference_stage(model), None, None, args.load, parallel,
            no_load_optim=True, no_load_rng=True, finetune=True,
        )  # fmt: skip
    return model.eval(), tokenizer, parallel
