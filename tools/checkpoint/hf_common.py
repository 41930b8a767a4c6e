"""What the GPT-2 and BERT Hugging Face conversions share: the QKV row order, the GeLU name, the checks
that a model fits the Hugging Face architectures, and tokenizer files.

QKV. Our fused query_key_value weight [3 n d, h] (n heads of size d) has its rows ordered
[heads, 3, head_dim]: head 0's q, k, v rows, then head 1's, ... (so a TP rank's contiguous slice holds
whole heads). Hugging Face orders them [3, heads, head_dim]: all q rows, all k rows, all v rows, heads
contiguous inside each. `per_head_to_blocks` and `blocks_to_per_head` convert a weight or bias between
the two; they are exact permutations, so the round trip is bitwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Optional

from torch import Tensor

from megatron.tokenizer import build_tokenizer
from tools.checkpoint.checkpoint_io import ToolError

GELU_TANH = "gelu_new"  # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): our bias_gelu_fusion / openai_gelu
GELU_ERF = "gelu"  # x Phi(x)


def per_head_to_blocks(qkv: Tensor, num_heads: int) -> Tensor:
    """Rows [heads, 3, head_dim] -> [3, heads, head_dim] (q | k | v blocks); `qkv` is [3 n d, ...]."""
    rest = qkv.shape[1:]
    return qkv.reshape(num_heads, 3, -1, *rest).transpose(0, 1).reshape(qkv.shape).contiguous()


def blocks_to_per_head(qkv: Tensor, num_heads: int) -> Tensor:
    """Rows [3, heads, head_dim] (q | k | v blocks) -> [heads, 3, head_dim]; inverse of per_head_to_blocks."""
    rest = qkv.shape[1:]
    return qkv.reshape(3, num_heads, -1, *rest).transpose(0, 1).reshape(qkv.shape).contiguous()


def hf_activation(saved_args: argparse.Namespace) -> str:
    """The Hugging Face activation name of our GeLU: tanh form with openai_gelu or bias_gelu_fusion."""
    tanh = getattr(saved_args, "openai_gelu", False) or getattr(saved_args, "bias_gelu_fusion", False)
    return GELU_TANH if tanh else GELU_ERF


def check_exportable(saved_args: argparse.Namespace, architecture: str) -> None:
    """ToolError naming the setting when the model uses a feature `architecture` does not have."""
    unsupported = []
    if getattr(saved_args, "position_embedding_type", "learned_absolute") != "learned_absolute":
        unsupported.append(f"--position-embedding-type {saved_args.position_embedding_type}")
    if getattr(saved_args, "embedding_layernorm", False):
        unsupported.append("--embedding-layernorm")
    if getattr(saved_args, "apply_residual_connection_post_layernorm", False):
        unsupported.append("--apply-residual-connection-post-layernorm (post-LN residuals)")
    for flag, name, plain in (
        ("--normalization RMSNorm", "normalization", "LayerNorm"),
        ("--swiglu", "swiglu", False),
        ("--group-query-attention", "group_query_attention", False),
        ("--untie-embeddings-and-output-weights", "untie_embeddings_and_output_weights", False),
        ("--disable-bias-linear", "add_bias_linear", True),
    ):
        if getattr(saved_args, name, plain) != plain:
            unsupported.append(flag)
    heads, hidden = saved_args.num_attention_heads, saved_args.hidden_size
    kv_channels = getattr(saved_args, "kv_channels", None) or hidden // heads
    if kv_channels * heads != hidden:
        unsupported.append(f"--kv-channels {kv_channels} x {heads} heads != hidden size {hidden}")
    if unsupported:
        raise ToolError(f"{architecture} cannot express this model: {'; '.join(unsupported)}")


def end_of_document_id(saved_args: argparse.Namespace) -> Optional[int]:
    """The tokenizer's end-of-document id (saved as eod_token, or from the tokenizer files), else None."""
    eod = getattr(saved_args, "eod_token", None)
    if eod is not None or getattr(saved_args, "tokenizer_type", None) is None:
        return eod
    try:
        return build_tokenizer(saved_args).eod
    except Exception:  # tokenizer files not available here: the config simply names no eos token
        return None


def copy_tokenizer_file(source: Optional[str], directory: str, name: str, what: str) -> bool:
    """Copy `source` to `<directory>/<name>`; False (with a warning) when the file is not available."""
    if not source:
        return False
    if not os.path.isfile(source):
        print(f"warning: {what} {source} not found; no {name} written", file=sys.stderr)
        return False
    shutil.copyfile(source, os.path.join(directory, name))
    return True


def copy_llama_tokenizer(saved_args: argparse.Namespace, directory: str, max_length: int) -> None:
    """HuggingFaceTokenizer: copy tokenizer.json and its side files (tokenizer_config.json,
    special_tokens_map.json) from the --tokenizer-model folder. Llama2Tokenizer: copy the SentencePiece
    model as tokenizer.model and describe it as a LlamaTokenizer (bos added, eos not)."""
    source = getattr(saved_args, "tokenizer_model", None)
    if saved_args.tokenizer_type == "Llama2Tokenizer":
        if copy_tokenizer_file(source, directory, "tokenizer.model", "--tokenizer-model"):
            config = {
                "tokenizer_class": "LlamaTokenizer",
                "model_max_length": max_length,
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": False,
            }
            with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2)
                f.write("\n")
        return
    folder = source if source and os.path.isdir(source) else os.path.dirname(source or "")
    tokenizer_json = (
        source if source and not os.path.isdir(source) else os.path.join(folder, "tokenizer.json")
    )
    if copy_tokenizer_file(tokenizer_json, directory, "tokenizer.json", "--tokenizer-model"):
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(folder, name)):
                shutil.copyfile(os.path.join(folder, name), os.path.join(directory, name))
