"""Import a Hugging Face GPT-2 folder (config.json + weights) as a checkpoint of this project.

    python tools/checkpoint/import_hf_gpt2.py --hf-dir hf/gpt2 --save checkpoints/gpt2 --tensor-model-parallel-size 2

Reads config.json (GPT2Config) and model.safetensors, a sharded model.safetensors.index.json, or
pytorch_model.bin, maps the tensors to our names (tools/checkpoint/hf_gpt2.py), pads the vocabulary to a
multiple of --make-vocab-size-divisible-by x TP with zero rows (as training computes it from the
tokenizer), splits over TP ranks and pipeline stages (--pipeline-model-parallel-size, an even split of the
layers), and writes

    <save>/latest_checkpointed_iteration.txt      "release" (default) or --iteration N
    <save>/release/mp_rank_XX[_YYY]/model_optim_rng.pt  model, args; no optimizer or RNG state
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

from megatron.arguments import build_parser
from megatron.tokenizer import vocab_size_with_padding
from tools.checkpoint.checkpoint_io import ToolError
from tools.checkpoint.hf_packages import missing_package_exit

try:
    from transformers import GPT2Config

    from tools.checkpoint.hf_gpt2 import gelu_flags_from_activation, hf_to_gpt_state
    from tools.checkpoint.hf_import import (
        import_args,
        layout_summary,
        read_hf_weights,
        run_import,
        set_layout_args,
        single_dtype,
        write_imported,
    )
except ModuleNotFoundError as e:
    raise missing_package_exit(e, "tools/checkpoint/import_hf_gpt2.py") from None


def get_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return import_args(__doc__.split("\n")[0], "GPT-2", argv)


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


def megatron_args(
    config: GPT2Config, tp: int, divisible_by: int, vocab_dir: Optional[str]
) -> argparse.Namespace:
    """Our saved-args Namespace (every flag at its default, then the model's fields) for a GPT2Config
    (the layout and dtype: hf_import.set_layout_args)."""
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
    has_tokenizer = all(os.path.isfile(os.path.join(hf_dir, n)) for n in ("vocab.json", "merges.txt"))
    args = megatron_args(config, tp, divisible_by, os.path.abspath(save_dir) if has_tokenizer else None)
    set_layout_args(args, tp, pp, single_dtype(model, hf_dir))
    copies = [(os.path.join(hf_dir, "vocab.json"), "vocab.json", "vocab file"),
              (os.path.join(hf_dir, "merges.txt"), "merges.txt", "merges file")]  # fmt: skip
    write_imported(model, args, save_dir, iteration, force, copies if has_tokenizer else ())
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = get_args(argv)
    saved = run_import(args, import_gpt2)
    print(
        f"imported {args.hf_dir} into {args.save}: {saved.num_layers} layers, hidden {saved.hidden_size}, "
        f"{saved.num_attention_heads} heads, {layout_summary(saved)}"
    )
    if saved.vocab_file is None:
        print("note: no vocab.json/merges.txt in --hf-dir; pass --vocab-file/--merge-file when training")


if __name__ == "__main__":
    main()
