"""Export a GPT or BERT checkpoint (any tensor-parallel size) to a Hugging Face model folder.

    python tools/checkpoint/export_hf.py --load checkpoints/gpt --output hf/gpt

GPT becomes `GPT2LMHeadModel` (tools/checkpoint/hf_gpt2.py), a Llama-shaped GPT (RoPE, RMSNorm, SwiGLU,
...) `LlamaForCausalLM` (tools/checkpoint/hf_llama.py), BERT `MegatronBertForPreTraining`, or
`MegatronBertForMaskedLM` when trained with --bert-no-binary-head (tools/checkpoint/hf_bert.py); the model
type is read from the checkpoint's tensors (BERT has lm_head.bias) and args. The folder holds

    config.json          GPT2Config / MegatronBertConfig; vocab_size is the PADDED vocabulary of the
                         checkpoint, so the Hugging Face logits equal ours on every column; activation
                         "gelu_new" (tanh GeLU, our default bias_gelu_fusion) or "gelu" (erf)
    model.safetensors    the weights in the checkpoint's dtype (tied output embeddings stored once)
    vocab.json, merges.txt  (GPT2BPETokenizer) or vocab.txt (BertWordPiece*), copied from the files the
                         checkpoint's args name, with a tokenizer_config.json; tokenizer.json with its
                         tokenizer_config.json / special_tokens_map.json (HuggingFaceTokenizer); tokenizer.model
                         with a LlamaTokenizer tokenizer_config.json (Llama2Tokenizer); other tokenizers: none

The TP shards are merged first. The folder is built under a temporary name and renamed when complete,
so a failed export leaves nothing under --output.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Optional

from tools.checkpoint.checkpoint_io import (
    ToolError,
    atomic_output_dir,
    check_distinct_paths,
    load_checkpoint_shards,
)
from tools.checkpoint.hf_common import copy_llama_tokenizer, copy_tokenizer_file
from tools.checkpoint.hf_packages import missing_package_exit
from tools.checkpoint.tp_layout import merge_shards

try:
    from safetensors.torch import save_file

    from tools.checkpoint.hf_bert import bert_to_hf_state, has_binary_head, megatron_bert_config_from_args
    from tools.checkpoint.hf_gpt2 import gpt2_config_from_args, gpt_to_hf_state
    from tools.checkpoint.hf_llama import is_llama_shaped, llama_config_from_args, llama_to_hf_state
except ModuleNotFoundError as e:
    raise missing_package_exit(e, "tools/checkpoint/export_hf.py") from None

GPT2_SPECIAL = "<|endoftext|>"


def get_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--load", required=True, help="Checkpoint folder (with its tracker file).")
    parser.add_argument("--output", required=True, help="Hugging Face folder to create (must not exist).")
    parser.add_argument("--force", action="store_true", help="Replace --output if it exists.")
    return parser.parse_args(argv)


def export_checkpoint(load_dir: str, output_dir: str, force: bool = False) -> str:
    """Write the Hugging Face folder of the checkpoint in `load_dir`; return its architecture name."""
    checkpoint = load_checkpoint_shards(load_dir)
    saved_args = checkpoint.args
    model = merge_shards(checkpoint.model_shards(), "model", getattr(saved_args, "swiglu", False))
    dtype = model["language_model.embedding.word_embeddings.weight"].dtype
    layers, heads = saved_args.num_layers, saved_args.num_attention_heads
    if "lm_head.bias" in model:
        binary_head = has_binary_head(model)
        config = megatron_bert_config_from_args(saved_args, dtype, binary_head)
        state = bert_to_hf_state(model, layers, heads)
    elif is_llama_shaped(saved_args):
        config = llama_config_from_args(saved_args, dtype)
        state = llama_to_hf_state(model, saved_args)
    else:
        config = gpt2_config_from_args(saved_args, dtype)
        state = gpt_to_hf_state(model, layers, heads)
    with atomic_output_dir(output_dir, force, "--output") as temp_dir:
        config.save_pretrained(temp_dir)
        save_file(state, os.path.join(temp_dir, "model.safetensors"), metadata={"format": "pt"})
        _write_tokenizer(saved_args, temp_dir, saved_args.max_position_embeddings)
    return config.architectures[0]


def _write_tokenizer(saved_args: argparse.Namespace, directory: str, max_length: int) -> None:
    """Copy the tokenizer files the saved args name and describe them in tokenizer_config.json."""
    tokenizer_type = getattr(saved_args, "tokenizer_type", None)
    if tokenizer_type == "GPT2BPETokenizer":
        vocab = copy_tokenizer_file(saved_args.vocab_file, directory, "vocab.json", "--vocab-file")
        merges = copy_tokenizer_file(saved_args.merge_file, directory, "merges.txt", "--merge-file")
        if not (vocab and merges):
            return
        config = {
            "tokenizer_class": "GPT2Tokenizer",
            "model_max_length": max_length,
            "bos_token": GPT2_SPECIAL,
            "eos_token": GPT2_SPECIAL,
            "unk_token": GPT2_SPECIAL,
            "add_prefix_space": False,
        }
    elif tokenizer_type in ("BertWordPieceLowerCase", "BertWordPieceCase"):
        if not copy_tokenizer_file(saved_args.vocab_file, directory, "vocab.txt", "--vocab-file"):
            return
        config = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": tokenizer_type == "BertWordPieceLowerCase",
            "model_max_length": max_length,
        }
    elif tokenizer_type in ("HuggingFaceTokenizer", "Llama2Tokenizer"):
        copy_llama_tokenizer(saved_args, directory, max_length)
        return
    else:
        print(f"note: tokenizer type {tokenizer_type} has no Hugging Face files to export; none written")
        return
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def main(argv: Optional[list[str]] = None) -> None:
    args = get_args(argv)
    try:
        check_distinct_paths(args.load, args.output, "--load", "--output")
        architecture = export_checkpoint(args.load, args.output, args.force)
    except (ToolError, OSError) as e:  # OSError: unreadable input, full disk, no permission
        raise SystemExit(f"error: {e}") from None
    print(f"exported {args.load} as {architecture} to {args.output}")


if __name__ == "__main__":
    main()
