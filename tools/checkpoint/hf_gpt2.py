"""Our GPT <-> Hugging Face GPT-2 (`GPT2LMHeadModel`): config fields and tensor names, both directions.

    ours (flat state dict, TP-merged)                       HF GPT2LMHeadModel
    language_model.embedding.word_embeddings.weight [V, h]   transformer.wte.weight [V, h] (lm_head.weight tied)
    language_model.embedding.position_embeddings.weight      transformer.wpe.weight [n_positions, h]
    language_model.encoder.layers.i.
        input_layernorm.{weight,bias}                        transformer.h.i.ln_1.{weight,bias}
        self_attention.query_key_value.weight [3h, h]        transformer.h.i.attn.c_attn.weight [h, 3h]
        self_attention.query_key_value.bias [3h]             transformer.h.i.attn.c_attn.bias [3h]
        self_attention.dense.{weight [h, h], bias}           transformer.h.i.attn.c_proj.{weight, bias}
        post_attention_layernorm.{weight,bias}               transformer.h.i.ln_2.{weight,bias}
        mlp.dense_h_to_4h.{weight [f, h], bias}              transformer.h.i.mlp.c_fc.{weight [h, f], bias}
        mlp.dense_4h_to_h.{weight [h, f], bias}              transformer.h.i.mlp.c_proj.{weight [f, h], bias}
    language_model.encoder.final_layernorm.{weight,bias}     transformer.ln_f.{weight,bias}

GPT-2's Conv1D computes y = x W + b with W stored [in, out], the transpose of nn.Linear's [out, in]; the
QKV rows are also reordered from our [heads, 3, head_dim] to q | k | v blocks (hf_common). Both
architectures are pre-LN with a final layernorm and tied output embeddings, and scale attention scores by
1/sqrt(head_dim), so the same weights give the same logits.

Vocabulary: the export keeps our PADDED vocabulary as `vocab_size`, so the HF logits equal ours column for
column (padding columns included; the tokenizer never produces those ids).
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
from torch import Tensor
from transformers import GPT2Config

from tools.checkpoint.checkpoint_io import ToolError
from tools.checkpoint.hf_common import (
    GELU_ERF,
    GELU_TANH,
    blocks_to_per_head,
    check_exportable,
    end_of_document_id,
    hf_activation,
    per_head_to_blocks,
)

EMBEDDING_NAMES = {  # ours -> HF, copied as they are
    "language_model.embedding.word_embeddings.weight": "transformer.wte.weight",
    "language_model.embedding.position_embeddings.weight": "transformer.wpe.weight",
    "language_model.encoder.final_layernorm.weight": "transformer.ln_f.weight",
    "language_model.encoder.final_layernorm.bias": "transformer.ln_f.bias",
}
# Per layer: (our suffix, HF suffix, how the tensor changes on the way to HF).
LAYER_NAMES = (
    ("input_layernorm.weight", "ln_1.weight", "copy"),
    ("input_layernorm.bias", "ln_1.bias", "copy"),
    ("self_attention.query_key_value.weight", "attn.c_attn.weight", "qkv_conv1d"),
    ("self_attention.query_key_value.bias", "attn.c_attn.bias", "qkv"),
    ("self_attention.dense.weight", "attn.c_proj.weight", "conv1d"),
    ("self_attention.dense.bias", "attn.c_proj.bias", "copy"),
    ("post_attention_layernorm.weight", "ln_2.weight", "copy"),
    ("post_attention_layernorm.bias", "ln_2.bias", "copy"),
    ("mlp.dense_h_to_4h.weight", "mlp.c_fc.weight", "conv1d"),
    ("mlp.dense_h_to_4h.bias", "mlp.c_fc.bias", "copy"),
    ("mlp.dense_4h_to_h.weight", "mlp.c_proj.weight", "conv1d"),
    ("mlp.dense_4h_to_h.bias", "mlp.c_proj.bias", "copy"),
)
TANH_ACTIVATIONS = (GELU_TANH, "gelu_pytorch_tanh", "gelu_fast")  # tanh-form GeLU in transformers


def _to_hf(kind: str, num_heads: int) -> Callable[[Tensor], Tensor]:
    return {
        "copy": lambda t: t,
        "conv1d": lambda t: t.t(),
        "qkv": lambda t: per_head_to_blocks(t, num_heads),
        "qkv_conv1d": lambda t: per_head_to_blocks(t, num_heads).t(),
    }[kind]


def _from_hf(kind: str, num_heads: int) -> Callable[[Tensor], Tensor]:
    return {
        "copy": lambda t: t,
        "conv1d": lambda t: t.t(),
        "qkv": lambda t: blocks_to_per_head(t, num_heads),
        "qkv_conv1d": lambda t: blocks_to_per_head(t.t(), num_heads),
    }[kind]


def gpt2_config_from_args(saved_args: argparse.Namespace, dtype: torch.dtype) -> GPT2Config:
    """The `transformers.GPT2Config` of a GPT model with the saved `args` (ToolError if GPT-2 cannot hold it)."""
    check_exportable(saved_args, "Hugging Face GPT-2")
    eod = end_of_document_id(saved_args)
    return GPT2Config(
        vocab_size=saved_args.padded_vocab_size,
        n_positions=saved_args.max_position_embeddings,
        n_embd=saved_args.hidden_size,
        n_layer=saved_args.num_layers,
        n_head=saved_args.num_attention_heads,
        n_inner=getattr(saved_args, "ffn_hidden_size", None) or 4 * saved_args.hidden_size,
        activation_function=hf_activation(saved_args),
        layer_norm_epsilon=getattr(saved_args, "layernorm_epsilon", 1e-5),
        resid_pdrop=getattr(saved_args, "hidden_dropout", 0.1),
        embd_pdrop=getattr(saved_args, "hidden_dropout", 0.1),
        attn_pdrop=getattr(saved_args, "attention_dropout", 0.1),
        initializer_range=getattr(saved_args, "init_method_std", 0.02),
        bos_token_id=eod,
        eos_token_id=eod,
        architectures=["GPT2LMHeadModel"],
        torch_dtype=dtype,
    )


def name_map(num_layers: int) -> list[tuple[str, str, str]]:
    """(our name, HF name, conversion kind) of every tensor, in our state-dict order (see the table above)."""
    embeddings = [(ours, hf, "copy") for ours, hf in EMBEDDING_NAMES.items()]
    layers = [
        (f"language_model.encoder.layers.{i}.{ours}", f"transformer.h.{i}.{hf}", kind)
        for i in range(num_layers)
        for ours, hf, kind in LAYER_NAMES
    ]
    return embeddings[:2] + layers + embeddings[2:]


def gpt_to_hf_state(model: dict[str, Tensor], num_layers: int, num_heads: int) -> dict[str, Tensor]:
    """Our TP-merged flat GPT state dict -> GPT2LMHeadModel's state dict without the tied lm_head.weight."""
    names = name_map(num_layers)
    expected = {ours for ours, _, _ in names}
    if set(model) != expected:
        raise ToolError(
            "the checkpoint is not a GPT model of this project: unexpected tensors "
            f"{sorted(set(model) - expected)[:5]}, missing {sorted(expected - set(model))[:5]}"
        )
    return {hf: _to_hf(kind, num_heads)(model[ours]).contiguous() for ours, hf, kind in names}


def hf_to_gpt_state(hf: dict[str, Tensor], num_layers: int, num_heads: int) -> dict[str, Tensor]:
    """GPT2LMHeadModel's (or GPT2Model's, without the `transformer.` prefix) state dict -> our flat GPT
    state dict. lm_head.weight must equal wte (tied, as our model is); attention mask buffers are ignored."""
    hf = {
        name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}": t
        for name, t in hf.items()
    }
    wte = hf.get("transformer.wte.weight")
    lm_head = hf.pop("lm_head.weight", None)
    if lm_head is not None and wte is not None and not torch.equal(lm_head, wte):
        raise ToolError(
            "lm_head.weight differs from transformer.wte.weight: untied output embeddings not supported"
        )
    hf = {name: t for name, t in hf.items() if not name.endswith((".attn.bias", ".attn.masked_bias"))}
    names = name_map(num_layers)
    expected = {hf_name for _, hf_name, _ in names}
    if set(hf) != expected:
        raise ToolError(
            f"not a GPT-2 state dict with {num_layers} layers: unexpected tensors "
            f"{sorted(set(hf) - expected)[:5]}, missing {sorted(expected - set(hf))[:5]}"
        )
    return {ours: _from_hf(kind, num_heads)(hf[hf_name]).contiguous() for ours, hf_name, kind in names}


def gelu_flags_from_activation(activation: str) -> dict[str, bool]:
    """Our (openai_gelu, bias_gelu_fusion) for a GPT-2 activation_function; ToolError for non-GeLU ones."""
    if activation in TANH_ACTIVATIONS:
        return {"openai_gelu": False, "bias_gelu_fusion": True}
    if activation == GELU_ERF:
        return {"openai_gelu": False, "bias_gelu_fusion": False}
    raise ToolError(
        f"activation_function {activation!r} is not supported (only GeLU: {GELU_ERF}, {', '.join(TANH_ACTIVATIONS)})"
    )
