"""Import a Hugging Face Llama folder (config.json + weights) as a checkpoint of this project, at any TP size.

    python tools/checkpoint/import_hf_llama.py --hf-dir hf/llama --save checkpoints/llama --tensor-model-parallel-size 2

Reads config.json (model_type "llama": LlamaForCausalLM) and model.safetensors, a sharded
model.safetensors.index.json, or pytorch_model.bin; maps the tensors to our names and layouts
(tools/checkpoint/hf_llama.py: QKV per query group, SwiGLU [gate; up]); pads the vocabulary to a multiple
of --make-vocab-size-divisible-by x TP with zero rows; splits over TP ranks (each shard's dense_h_to_4h
holds [its gate slice; its up slice]); and writes a release checkpoint (or --iteration N) whose args are
the Megatron flags of that model: --position-embedding-type rope --rotary-base (rope_theta)
--normalization RMSNorm --norm-epsilon --swiglu --ffn-hidden-size --group-query-attention
--num-query-groups (num_key_value_heads) [--untie-embeddings-and-output-weights] [--disable-bias-linear].
A tokenizer.json in --hf-dir is copied (with tokenizer_config.json and special_tokens_map.json) and named
as --tokenizer-type HuggingFaceTokenizer --tokenizer-model <save>/tokenizer.json. The output is built under
a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

import torch
from transformers import LlamaConfig

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
from tools.checkpoint.hf_llama import hf_to_llama_state
from tools.checkpoint.import_hf_gpt2 import read_hf_weights
from tools.checkpoint.tp_layout import repad_vocab, split_whole

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def get_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--hf-dir", required=True, help="Hugging Face Llama folder (config.json, weights).")
    parser.add_argument("--save", required=True, help="Checkpoint folder to create (must not exist).")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size of the output.")
    parser.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="Pad the vocabulary to a multiple of this x TP (use the value you will train with).",
    )
    parser.add_argument("--iteration", type=int, default=None, help="Write iter_XXXXXXX instead of release.")
    parser.add_argument("--force", action="store_true", help="Replace --save if it exists.")
    args = parser.parse_args(argv)
    if args.tensor_model_parallel_size < 1 or args.make_vocab_size_divisible_by < 1:
        parser.error("--tensor-model-parallel-size and --make-vocab-size-divisible-by must be >= 1")
    if args.iteration is not None and args.iteration < 0:
        parser.error("--iteration must be >= 0")
    return args


def read_llama_config(hf_dir: str) -> LlamaConfig:
    """LlamaConfig from `<hf_dir>/config.json`; ToolError unless it is a Llama our model reproduces."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ToolError(f"--hf-dir {hf_dir}: no config.json (not a Hugging Face model folder)")
    try:
        with open(path, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
        if model_type != "llama":
            raise ToolError(
                f"{path}: model_type is {model_type!r}; this tool imports Llama models (model_type 'llama') only"
            )
        config = LlamaConfig.from_json_file(path)
    except (OSError, ValueError) as e:
        raise ToolError(f"{path}: cannot read it as a Llama config: {e}") from None
    problems = []
    if config.hidden_act != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} (SwiGLU needs 'silu')")
    if getattr(config, "rope_scaling", None):
        problems.append(f"rope_scaling {config.rope_scaling} (only plain RoPE is implemented)")
    if getattr(config, "pretraining_tp", 1) != 1:
        problems.append(f"pretraining_tp {config.pretraining_tp}")
    if bool(config.attention_bias) != bool(getattr(config, "mlp_bias", False)):
        problems.append("attention_bias and mlp_bias differ (--disable-bias-linear covers both)")
    if float(config.rope_theta) != int(config.rope_theta):
        problems.append(f"rope_theta {config.rope_theta} is not an integer (--rotary-base)")
    if problems:
        raise ToolError(f"{path}: our model cannot reproduce {'; '.join(problems)}")
    return config


def megatron_args(
    config: LlamaConfig, tp: int, divisible_by: int, dtype: torch.dtype, tokenizer: Optional[str]
) -> argparse.Namespace:
    """Our saved-args Namespace (every flag at its default, then the Llama model's flags)."""
    args = build_parser().parse_args([])
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for name, value in dict(
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        kv_channels=head_dim,
        group_query_attention=config.num_key_value_heads != config.num_attention_heads,
        num_query_groups=config.num_key_value_heads,
        seq_length=config.max_position_embeddings,
        max_position_embeddings=config.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=int(config.rope_theta),
        normalization="RMSNorm",
        layernorm_epsilon=config.rms_norm_eps,
        swiglu=True,
        untie_embeddings_and_output_weights=not config.tie_word_embeddings,
        add_bias_linear=bool(config.attention_bias),
        hidden_dropout=0.0,
        attention_dropout=config.attention_dropout,
        init_method_std=config.initializer_range,
        make_vocab_size_divisible_by=divisible_by,
        padded_vocab_size=vocab_size_with_padding(config.vocab_size, divisible_by, tp),
        tokenizer_type="HuggingFaceTokenizer" if tokenizer else None,
        tokenizer_model=tokenizer,
        eod_token=config.eos_token_id,
        bos_token=config.bos_token_id,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        world_size=tp,
        data_parallel_size=1,
        fp16=dtype == torch.float16,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        consumed_train_samples=0,
        consumed_valid_samples=0,
    ).items():
        setattr(args, name, value)
    if not args.group_query_attention:
        args.num_query_groups = None
    return args


def import_llama(
    hf_dir: str, save_dir: str, tp: int, divisible_by: int, iteration: Optional[int], force: bool = False
) -> argparse.Namespace:
    """Write the checkpoint of the Llama in `hf_dir` to `save_dir` (see the module docstring); return its args."""
    if not os.path.isdir(hf_dir):
        raise ToolError(f"--hf-dir {hf_dir}: no such directory")
    config = read_llama_config(hf_dir)
    heads, groups, ffn = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    if heads % groups != 0 or groups % tp != 0 or ffn % tp != 0:
        raise ToolError(
            f"--tensor-model-parallel-size {tp} must divide the {groups} key/value heads (which must divide "
            f"the {heads} attention heads) and the MLP width {ffn}"
        )
    model = hf_to_llama_state(read_hf_weights(hf_dir), config)
    if model["language_model.embedding.word_embeddings.weight"].size(0) != config.vocab_size:
        raise ToolError(
            f"{hf_dir}: embed_tokens does not have config.json's vocab_size {config.vocab_size} rows"
        )
    dtypes = {tensor.dtype for tensor in model.values()}
    if len(dtypes) != 1:
        raise ToolError(f"{hf_dir}: the weights mix dtypes {sorted(map(str, dtypes))}")
    has_tokenizer = os.path.isfile(os.path.join(hf_dir, "tokenizer.json"))
    tokenizer = os.path.join(os.path.abspath(save_dir), "tokenizer.json") if has_tokenizer else None
    args = megatron_args(config, tp, divisible_by, dtypes.pop(), tokenizer)
    shards = split_whole(repad_vocab(model, args.padded_vocab_size), tp, swiglu=True)
    with atomic_output_dir(save_dir, force, "--save") as temp_dir:
        for name in TOKENIZER_FILES if has_tokenizer else ():
            if os.path.isfile(os.path.join(hf_dir, name)):
                copy_tokenizer_file(os.path.join(hf_dir, name), temp_dir, name, "tokenizer file")
        states = [shard_file_state(args, iteration or 0, shard) for shard in shards]
        write_checkpoint(temp_dir, iteration or 0, iteration is None, states)
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = get_args(argv)
    try:
        check_distinct_paths(args.hf_dir, args.save, "--hf-dir", "--save")
        saved = import_llama(
            args.hf_dir,
            args.save,
            args.tensor_model_parallel_size,
            args.make_vocab_size_divisible_by,
            args.iteration,
            args.force,
        )
    except (ToolError, OSError) as e:  # OSError: unreadable input, full disk, no permission
        raise SystemExit(f"error: {e}") from None
    print(
        f"imported {args.hf_dir} into {args.save}: {saved.num_layers} layers, hidden {saved.hidden_size}, "
        f"{saved.num_attention_heads} heads in {saved.num_query_groups or saved.num_attention_heads} query "
        f"groups, padded vocabulary {saved.padded_vocab_size}, tensor-parallel size {saved.tensor_model_parallel_size}"
    )
    if saved.tokenizer_model is None:
        print(
            "note: no tokenizer.json in --hf-dir; pass --tokenizer-type and --tokenizer-model when training"
        )


if __name__ == "__main__":
    main()
