"""Import a Hugging Face Llama folder (config.json + weights) as a checkpoint of this project, at any TP x PP.

    python tools/checkpoint/import_hf_llama.py --hf-dir hf/llama --save checkpoints/llama \
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

Reads config.json (model_type "llama": LlamaForCausalLM) and model.safetensors, a sharded
model.safetensors.index.json, or pytorch_model.bin; maps the tensors to our names and layouts
(tools/checkpoint/hf_llama.py: QKV per query group, SwiGLU [gate; up]); pads the vocabulary to a multiple
of --make-vocab-size-divisible-by x TP with zero rows; splits over TP ranks (each shard's dense_h_to_4h
holds [its gate slice; its up slice]) and into even pipeline stages (--pipeline-model-parallel-size; the
last stage holds the final norm and the untied output layer, or its copy of a tied word embedding); and
writes `mp_rank_TT[_PPP]/model_optim_rng.pt` (tools/checkpoint/hf_import.py) as a release checkpoint (or
--iteration N) whose args are the Megatron flags of that model: --position-embedding-type rope
--rotary-base (rope_theta) --normalization RMSNorm --norm-epsilon --swiglu --ffn-hidden-size
--group-query-attention --num-query-groups (num_key_value_heads) [--untie-embeddings-and-output-weights]
[--disable-bias-linear]. A tokenizer.json in --hf-dir is copied (with tokenizer_config.json and
special_tokens_map.json) and named as --tokenizer-type HuggingFaceTokenizer --tokenizer-model
<save>/tokenizer.json. The output is built under a temporary name and renamed when complete.
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
    from transformers import LlamaConfig

    from tools.checkpoint.hf_import import (
        import_args,
        layout_summary,
        read_hf_weights,
        run_import,
        set_layout_args,
        single_dtype,
        write_imported,
    )
    from tools.checkpoint.hf_llama import hf_to_llama_state
except ModuleNotFoundError as e:
    raise missing_package_exit(e, "tools/checkpoint/import_hf_llama.py") from None

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def get_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return import_args(__doc__.split("\n")[0], "Llama", argv)


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
    config: LlamaConfig, tp: int, divisible_by: int, tokenizer: Optional[str]
) -> argparse.Namespace:
    """Our saved-args Namespace (every flag at its default, then the Llama model's flags; the layout and
    dtype: hf_import.set_layout_args)."""
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
    ).items():
        setattr(args, name, value)
    if not args.group_query_attention:
        args.num_query_groups = None
    return args


def import_llama(
    hf_dir: str,
    save_dir: str,
    tp: int,
    divisible_by: int,
    iteration: Optional[int],
    force: bool = False,
    pp: int = 1,
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
    has_tokenizer = os.path.isfile(os.path.join(hf_dir, "tokenizer.json"))
    tokenizer = os.path.join(os.path.abspath(save_dir), "tokenizer.json") if has_tokenizer else None
    args = megatron_args(config, tp, divisible_by, tokenizer)
    set_layout_args(args, tp, pp, single_dtype(model, hf_dir))
    copies = [
        (os.path.join(hf_dir, name), name, "tokenizer file")
        for name in TOKENIZER_FILES
        if has_tokenizer and os.path.isfile(os.path.join(hf_dir, name))
    ]
    write_imported(model, args, save_dir, iteration, force, copies)
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = get_args(argv)
    saved = run_import(args, import_llama)
    print(
        f"imported {args.hf_dir} into {args.save}: {saved.num_layers} layers, hidden {saved.hidden_size}, "
        f"{saved.num_attention_heads} heads in {saved.num_query_groups or saved.num_attention_heads} query "
        f"groups, {layout_summary(saved)}"
    )
    if saved.tokenizer_model is None:
        print(
            "note: no tokenizer.json in --hf-dir; pass --tokenizer-type and --tokenizer-model when training"
        )


if __name__ == "__main__":
    main()
