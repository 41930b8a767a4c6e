"""What the Hugging Face import tools (import_hf_gpt2.py, import_hf_llama.py) share: their command line,
reading the Hugging Face weights, and writing the imported model as a TP x PP checkpoint.

The whole model (flat state dict, our names, the vocabulary padded for the target TP size) is split over
TP ranks first (tools/checkpoint/tp_layout.py; SwiGLU's [gate; up] as [gate_r; up_r] per rank), then each
TP shard into even pipeline stages (tools/checkpoint/pp_layout.py), and written as
`mp_rank_TT[_PPP]/model_optim_rng.pt` under a temporary folder renamed to --save when complete.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from typing import Callable, Optional

import torch
from safetensors.torch import load_file
from torch import Tensor

from tools.checkpoint.checkpoint_io import (
    ToolError,
    atomic_output_dir,
    check_distinct_paths,
    shard_file_state,
    write_checkpoint,
)
from tools.checkpoint.hf_common import copy_tokenizer_file
from tools.checkpoint.pp_layout import split_stages
from tools.checkpoint.tp_layout import repad_vocab, split_whole


def import_args(description: str, model: str, argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The import tools' flags: --hf-dir (a Hugging Face `model` folder), --save, the target
    --tensor-model-parallel-size and --pipeline-model-parallel-size, --make-vocab-size-divisible-by,
    --iteration, --force; argparse's usage error for out-of-range values."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument(
        "--hf-dir", required=True, help=f"Hugging Face {model} folder (config.json, weights)."
    )
    parser.add_argument("--save", required=True, help="Checkpoint folder to create (must not exist).")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size of the output.")
    parser.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        default=1,
        help="Pipeline stages of the output (even split of the layers).",
    )
    parser.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="Pad the vocabulary to a multiple of this x TP (use the value you will train with).",
    )
    parser.add_argument(
        "--iteration",
        type=int,
        default=None,
        help="Write an iteration checkpoint iter_XXXXXXX instead of a release checkpoint.",
    )
    parser.add_argument("--force", action="store_true", help="Replace --save if it exists.")
    args = parser.parse_args(argv)
    for flag in (
        "tensor_model_parallel_size",
        "pipeline_model_parallel_size",
        "make_vocab_size_divisible_by",
    ):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.iteration is not None and args.iteration < 0:
        parser.error("--iteration must be >= 0")
    return args


def read_hf_weights(hf_dir: str) -> dict[str, Tensor]:
    """The state dict in model.safetensors, the shards of model.safetensors.index.json, or pytorch_model.bin."""
    single = os.path.join(hf_dir, "model.safetensors")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    pickled = os.path.join(hf_dir, "pytorch_model.bin")
    try:
        if os.path.isfile(single):
            return load_file(single)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            state: dict[str, Tensor] = {}
            for name in files:
                state.update(load_file(os.path.join(hf_dir, name)))
            return state
        if os.path.isfile(pickled):
            return torch.load(pickled, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which folder
        raise ToolError(f"--hf-dir {hf_dir}: cannot read the weights: {type(e).__name__}: {e}") from None
    raise ToolError(
        f"--hf-dir {hf_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin found"
    )


def single_dtype(model: dict[str, Tensor], hf_dir: str) -> torch.dtype:
    """The one dtype of all weights; ToolError when they mix dtypes."""
    dtypes = {tensor.dtype for tensor in model.values()}
    if len(dtypes) != 1:
        raise ToolError(f"{hf_dir}: the weights mix dtypes {sorted(map(str, dtypes))}")
    return dtypes.pop()


def set_layout_args(args: argparse.Namespace, tp: int, pp: int, dtype: torch.dtype) -> None:
    """The saved args' parallel layout (TP x PP, DP 1), dtype flags and zero consumed samples."""
    args.tensor_model_parallel_size = tp
    args.pipeline_model_parallel_size = pp
    args.world_size = tp * pp
    args.data_parallel_size = 1
    args.fp16 = dtype == torch.float16
    args.bf16 = dtype == torch.bfloat16
    args.params_dtype = dtype
    args.consumed_train_samples = 0
    args.consumed_valid_samples = 0


def write_imported(
    model: dict[str, Tensor],
    args: argparse.Namespace,
    save_dir: str,
    iteration: Optional[int],
    force: bool,
    copies: Sequence[tuple[str, str, str]] = (),
) -> None:
    """Write `model` (whole, our names) as the checkpoint `args` describe (TP x PP from
    set_layout_args, the vocabulary padded to args.padded_vocab_size, SwiGLU layout when args.swiglu):
    a release unless `iteration` is given. `copies` (source, name, what) are copied beside it (tokenizer
    files). ToolError for a layout the model cannot be split into."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    swiglu = bool(getattr(args, "swiglu", False))
    try:
        shards = [
            stage
            for shard in split_whole(repad_vocab(model, args.padded_vocab_size), tp, swiglu=swiglu)
            for stage in split_stages(shard, args.num_layers, pp, "--pipeline-model-parallel-size")
        ]
    except ValueError as e:
        raise ToolError(str(e)) from None
    with atomic_output_dir(save_dir, force, "--save") as temp_dir:
        for source, name, what in copies:
            copy_tokenizer_file(source, temp_dir, name, what)
        states = [shard_file_state(args, iteration or 0, shard) for shard in shards]
        write_checkpoint(temp_dir, iteration or 0, iteration is None, states, pp)


def run_import(args: argparse.Namespace, import_fn: Callable[..., argparse.Namespace]) -> argparse.Namespace:
    """Call import_fn(hf_dir, save, tp, divisible_by, iteration, force, pp) for the parsed flags; a
    ToolError or OSError (unreadable input, full disk, no permission) exits with its message."""
    try:
        check_distinct_paths(args.hf_dir, args.save, "--hf-dir", "--save")
        return import_fn(
            args.hf_dir,
            args.save,
            args.tensor_model_parallel_size,
            args.make_vocab_size_divisible_by,
            args.iteration,
            args.force,
            args.pipeline_model_parallel_size,
        )
    except (ToolError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


def layout_summary(saved: argparse.Namespace) -> str:
    return (
        f"padded vocabulary {saved.padded_vocab_size}, tensor-parallel size {saved.tensor_model_parallel_size}, "
        f"pipeline-parallel size {saved.pipeline_model_parallel_size}"
    )
