"""Import a Hugging Face GPT-2 folder (config.json + weights) as a checkpoint of this project.

    python tools/checkpoint/import_hf_gpt2.py --hf-dir hf/gpt2 --save checkpoints/gpt2 --tensor-model-parallel-size 2

Reads config.json (GPT2Config) and model.safetensors, a sharded model.safetensors.index.json, or
pytorch_model.bin, maps the tensors to our names (tools/checkpoint/hf_gpt2.py), pads the vocabulary to a
multiple of --make-vocab-size-divisible-by x TP with zero rows (as training computes it from the
tokenizer), splits over TP ranks, and writes

    <save>/latest_checkpointed_iteration.txt      "release" (default) or --iteration N
    <save>/release/mp_rank_XX/model_optim_rng.pt  model, args; no optimizer or RNG state
    <save>/vocab.json, <save>/merges.txt          copied from --hf-dir when present; args point at them

`args` carries Megatron's names for the model: num_layers, hidden_size, ffn_hidden_size,
num_attention_heads, kv_channels, max_position_embeddings, seq_length (= n_positions), padded_vocab_size,
make_vocab_size_divisible_by, tokenizer_type GPT2BPETokenizer, vocab_file, merge_file, openai_gelu False and
bias_gelu_fusion True for the tanh GeLU ("gelu_new") or False for "gelu", layernorm_epsilon,
tensor_model_parallel_size, params_dtype (the weights' dtype), ...; every other flag has its default.
Train or evaluate from it with the same model flags and --load <save> (a release loads the weights only).
The output is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import torch
from torch import Tensor

from megatron.arguments import build_parser
from megatron.tokenizer import vocab_size_with_padding
from tools.checkpoint.checkpoint_io import (
    ToolError,
    atomic_output_dir,
    check_distinct_paths,
    shard_file_state,
    write_checkpoint,
)
from tools.checkpoint.hf_common import copy_tokenizer_file
from tools.checkpoint.hf_packages import missing_package_exit
from tools.checkpoint.pp_layout import split_stages
from tools.checkpoint.tp_layout import repad_vocab, split_whole

try:
    from safetensors.torch import load_file
    from transformers import GPT2Config

    from tools.checkpoint.hf_gpt2 import gelu_flags_from_activation, hf_to_gpt_state
except ModuleNotFoundError as e:
    raise missing_package_exit(e, "tools/checkpoint/import_hf_gpt2.py") from None


def get_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--hf-dir", required=True, help="Hugging Face GPT-2 folder (config.json, weights).")
    parser.add_argument("--save", required=True, help="Checkpoint folder to create (must not exist).")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size of the output.")
    parser.add_argument(
        "--pipeline-model-parallel-size",
        type=int,
        default=1,
        help="Pipeline stages of the output (even split).",
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
    if args.tensor_model_parallel_size < 1:
        parser.error("--tensor-model-parallel-size must be >= 1")
    if args.pipeline_model_parallel_size < 1:
        parser.error("--pipeline-model-parallel-size must be >= 1")
    if args.make_vocab_size_divisible_by < 1:
        parser.error("--make-vocab-size-divisible-by must be >= 1")
    if args.iteration is not None and args.iteration < 0:
        parser.error("--iteration must be >= 0")
    return args


def read_gpt2_config(hf_dir: str) -> GPT2Config:
    """GPT2Config from `<hf_dir>/config.json`; ToolError unless it is a GPT-2 our model can reproduce."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ToolError(f"--hf-dir {hf_dir}: no config.json (not a Hugging Face model folder)")
    try:
        config = GPT2Config.from_json_file(path)
        with open(path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise ToolError(f"{path}: cannot read it as a GPT-2 config: {e}") from None
    if model_type != "gpt2":
        raise ToolError(f"{path}: model_type is {model_type!r}, this tool imports 'gpt2' models only")
    if not config.scale_attn_weights or config.scale_attn_by_inverse_layer_idx or config.add_cross_attention:
        raise ToolError(
            f"{path}: scale_attn_weights=false, scale_attn_by_inverse_layer_idx or add_cross_attention "
            "change GPT-2's attention in ways our model does not reproduce"
        )
    if config.n_embd % config.n_head != 0:
        raise ToolError(f"{path}: n_embd {config.n_embd} is not divisible by n_head {config.n_head}")
    return config


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


def megatron_args(
    config: GPT2Config, tp: int, divisible_by: int, dtype: torch.dtype, vocab_dir: Optional[str]
) -> argparse.Namespace:
    """Our saved-args Namespace (every flag at its default, then the model's fields) for a GPT2Config."""
    args = build_parser().parse_args([])
    ffn = config.n_inner or 4 * config.n_embd
    args.num_layers = config.n_layer
    args.hidden_size = config.n_embd
    args.ffn_hidden_size = ffn
    args.num_attention_heads = config.n_head
    args.kv_channels = config.n_embd // config.n_head
    args.seq_length = config.n_positions
    args.max_position_embeddings = config.n_positions
    args.layernorm_epsilon = config.layer_norm_epsilon
    for name, value in gelu_flags_from_activation(config.activation_function).items():
        setattr(args, name, value)
    args.hidden_dropout = config.resid_pdrop
    args.attention_dropout = config.attn_pdrop
    args.init_method_std = config.initializer_range
    args.make_vocab_size_divisible_by = divisible_by
    args.padded_vocab_size = vocab_size_with_padding(config.vocab_size, divisible_by, tp)
    args.tokenizer_type = "GPT2BPETokenizer"
    args.vocab_file = os.path.join(vocab_dir, "vocab.json") if vocab_dir else None
    args.merge_file = os.path.join(vocab_dir, "merges.txt") if vocab_dir else None
    args.eod_token = config.eos_token_id
    args.tensor_model_parallel_size = tp
    args.pipeline_model_parallel_size = 1
    args.world_size = tp
    args.data_parallel_size = 1
    args.fp16 = dtype == torch.float16
    args.bf16 = dtype == torch.bfloat16
    args.params_dtype = dtype
    args.consumed_train_samples = 0
    args.consumed_valid_samples = 0
    return args


def import_gpt2(
    hf_dir: str,
    save_dir: str,
    tp: int,
    divisible_by: int,
    iteration: Optional[int],
    force: bool = False,
    pp: int = 1,
) -> argparse.Namespace:
    """Write the checkpoint of the GPT-2 in `hf_dir` to `save_dir` (see the module docstring); return its args."""
    if not os.path.isdir(hf_dir):
        raise ToolError(f"--hf-dir {hf_dir}: no such directory")
    config = read_gpt2_config(hf_dir)
    ffn = config.n_inner or 4 * config.n_embd
    if config.n_head % tp != 0 or ffn % tp != 0:
        raise ToolError(
            f"--tensor-model-parallel-size {tp} must divide the {config.n_head} attention heads and the "
            f"MLP width {ffn}"
        )
    model = hf_to_gpt_state(read_hf_weights(hf_dir), config.n_layer, config.n_head)
    word = model["language_model.embedding.word_embeddings.weight"]
    if word.size(0) != config.vocab_size:
        raise ToolError(
            f"{hf_dir}: wte has {word.size(0)} rows but config.json says vocab_size {config.vocab_size}"
        )
    dtypes = {tensor.dtype for tensor in model.values()}
    if len(dtypes) != 1:
        raise ToolError(f"{hf_dir}: the weights mix dtypes {sorted(map(str, dtypes))}")
    has_tokenizer = all(os.path.isfile(os.path.join(hf_dir, n)) for n in ("vocab.json", "merges.txt"))
    final_dir = os.path.abspath(save_dir)
    args = megatron_args(config, tp, divisible_by, dtypes.pop(), final_dir if has_tokenizer else None)
    args.pipeline_model_parallel_size = pp
    args.world_size = tp * pp
    try:
        shards = [
            stage
            for shard in split_whole(repad_vocab(model, args.padded_vocab_size), tp)
            for stage in split_stages(shard, config.n_layer, pp, "--pipeline-model-parallel-size")
        ]
    except ValueError as e:
        raise ToolError(str(e)) from None
    release = iteration is None
    with atomic_output_dir(save_dir, force, "--save") as temp_dir:
        if has_tokenizer:
            copy_tokenizer_file(os.path.join(hf_dir, "vocab.json"), temp_dir, "vocab.json", "vocab file")
            copy_tokenizer_file(os.path.join(hf_dir, "merges.txt"), temp_dir, "merges.txt", "merges file")
        states = [shard_file_state(args, iteration or 0, shard) for shard in shards]
        write_checkpoint(temp_dir, iteration or 0, release, states, pp)
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = get_args(argv)
    try:
        check_distinct_paths(args.hf_dir, args.save, "--hf-dir", "--save")
        saved = import_gpt2(
            args.hf_dir,
            args.save,
            args.tensor_model_parallel_size,
            args.make_vocab_size_divisible_by,
            args.iteration,
            args.force,
            args.pipeline_model_parallel_size,
        )
    except (ToolError, OSError) as e:  # OSError: unreadable input, full disk, no permission
        raise SystemExit(f"error: {e}") from None
    print(
        f"imported {args.hf_dir} into {args.save}: {saved.num_layers} layers, hidden {saved.hidden_size}, "
        f"{saved.num_attention_heads} heads, padded vocabulary {saved.padded_vocab_size}, "
        f"tensor-parallel size {saved.tensor_model_parallel_size}, pipeline-parallel size "
        f"{saved.pipeline_model_parallel_size}"
    )
    if saved.vocab_file is None:
        print("note: no vocab.json/merges.txt in --hf-dir; pass --vocab-file/--merge-file when training")


if __name__ == "__main__":
    main()
