"""Our Llama-shaped GPT <-> Hugging Face `LlamaForCausalLM`: config fields and tensor names, both directions.

    ours (flat state dict, TP-merged)                        HF LlamaForCausalLM
    language_model.embedding.word_embeddings.weight [V, h]    model.embed_tokens.weight
    language_model.encoder.layers.i.
        input_layernorm.weight (RMSNorm)                      model.layers.i.input_layernorm.weight
        self_attention.query_key_value.weight                 model.layers.i.self_attn.{q,k,v}_proj.weight
            rows [G, n/G + 2, d]: per query group its n/G         q [n d, h], k and v [G d, h]; query head j
            query heads, its key head, its value head             belongs to group j // (n/G) in both
        self_attention.dense.weight [h, n d]                  model.layers.i.self_attn.o_proj.weight
        post_attention_layernorm.weight                       model.layers.i.post_attention_layernorm.weight
        mlp.dense_h_to_4h.weight [2 f, h] = [gate; up]        model.layers.i.mlp.{gate,up}_proj.weight [f, h]
        mlp.dense_4h_to_h.weight [h, f]                       model.layers.i.mlp.down_proj.weight
    language_model.encoder.final_layernorm.weight             model.norm.weight
    language_model.output_layer.weight (untied) [V, h]        lm_head.weight (tie_word_embeddings false)

With biases (no --disable-bias-linear) the .bias tensors follow their weights (HF attention_bias and
mlp_bias). RoPE: both use the non-interleaved rotate-half form on the same q/k rows, with the same
inverse frequencies rope_theta^(-2i/d), so no permutation of the q/k rows is needed (tests check the
logits). The export keeps our PADDED vocabulary as vocab_size, so the logits match column for column.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
from torch import Tensor
from transformers import LlamaConfig

from megatron.tokenizer import build_tokenizer
from tools.checkpoint.checkpoint_io import ToolError
from tools.checkpoint.hf_common import end_of_document_id

PREFIX = "language_model.encoder.layers"
EMBEDDING = "language_model.embedding.word_embeddings.weight"
FINAL_NORM = "language_model.encoder.final_layernorm.weight"
OUTPUT_LAYER = "language_model.output_layer.weight"
LLAMA_FEATURES = ("position_embedding_type", "normalization", "swiglu", "untie_embeddings_and_output_weights")


def is_llama_shaped(saved_args: argparse.Namespace) -> bool:
    """True when the model uses any Llama-family feature (RoPE, RMSNorm, SwiGLU, an untied output layer)."""
    return (
        getattr(saved_args, "position_embedding_type", "learned_absolute") == "rope"
        or getattr(saved_args, "normalization", "LayerNorm") == "RMSNorm"
        or getattr(saved_args, "swiglu", False)
        or getattr(saved_args, "untie_embeddings_and_output_weights", False)
    )


def num_query_groups(saved_args: argparse.Namespace) -> int:
    if getattr(saved_args, "group_query_attention", False):
        return saved_args.num_query_groups
    return saved_args.num_attention_heads


def check_llama_exportable(saved_args: argparse.Namespace) -> None:
    """ToolError naming every setting that LlamaForCausalLM cannot express."""
    missing = []
    if getattr(saved_args, "position_embedding_type", "learned_absolute") != "rope":
        missing.append("--position-embedding-type rope")
    if getattr(saved_args, "rotary_percent", 1.0) != 1.0:
        missing.append("--rotary-percent 1.0")
    if getattr(saved_args, "normalization", "LayerNorm") != "RMSNorm":
        missing.append("--normalization RMSNorm")
    if not getattr(saved_args, "swiglu", False):
        missing.append("--swiglu")
    if getattr(saved_args, "embedding_layernorm", False):
        missing.append("no --embedding-layernorm")
    if getattr(saved_args, "apply_residual_connection_post_layernorm", False):
        missing.append("no --apply-residual-connection-post-layernorm")
    if missing:
        raise ToolError(f"Hugging Face LlamaForCausalLM needs {', '.join(missing)}; this checkpoint differs")


def llama_config_from_args(saved_args: argparse.Namespace, dtype: torch.dtype) -> LlamaConfig:
    """The LlamaConfig of a checkpoint with the saved `args` (ToolError if Llama cannot hold it)."""
    check_llama_exportable(saved_args)
    eod = end_of_document_id(saved_args)
    bias = getattr(saved_args, "add_bias_linear", True)
    return LlamaConfig(
        vocab_size=saved_args.padded_vocab_size,
        hidden_size=saved_args.hidden_size,
        intermediate_size=saved_args.ffn_hidden_size,
        num_hidden_layers=saved_args.num_layers,
        num_attention_heads=saved_args.num_attention_heads,
        num_key_value_heads=num_query_groups(saved_args),
        head_dim=saved_args.kv_channels,
        hidden_act="silu",
        max_position_embeddings=saved_args.max_position_embeddings,
        rms_norm_eps=saved_args.layernorm_epsilon,
        rope_theta=float(getattr(saved_args, "rotary_base", 10000)),
        attention_bias=bias,
        mlp_bias=bias,
        attention_dropout=getattr(saved_args, "attention_dropout", 0.0),
        initializer_range=getattr(saved_args, "init_method_std", 0.02),
        tie_word_embeddings=not getattr(saved_args, "untie_embeddings_and_output_weights", False),
        bos_token_id=_bos_id(saved_args),
        eos_token_id=eod,
        architectures=["LlamaForCausalLM"],
        torch_dtype=dtype,
    )


def _bos_id(saved_args: argparse.Namespace) -> Optional[int]:
    """The beginning-of-sequence id: saved by the import as bos_token, else the tokenizer's, else None."""
    bos = getattr(saved_args, "bos_token", None)
    if bos is not None or getattr(saved_args, "tokenizer_type", None) is None:
        return bos
    try:
        return build_tokenizer(saved_args).bos
    except Exception:  # tokenizer files not available here, or no BOS token: the config names none
        return None


def _qkv_to_hf(qkv: Tensor, heads: int, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows [G, n/G + 2, d] -> (q [n d], k [G d], v [G d]) rows; any trailing dims (weight: h) kept."""
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, heads // groups + 2, -1, *rest)
    per_group = heads // groups
    q = grouped[:, :per_group].reshape(-1, *rest)
    k = grouped[:, per_group].reshape(-1, *rest)
    v = grouped[:, per_group + 1].reshape(-1, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


def _qkv_from_hf(q: Tensor, k: Tensor, v: Tensor, heads: int, groups: int) -> Tensor:
    """Inverse of _qkv_to_hf."""
    rest = q.shape[1:]
    grouped = torch.cat(
        [
            q.reshape(groups, heads // groups, -1, *rest),
            k.reshape(groups, 1, -1, *rest),
            v.reshape(groups, 1, -1, *rest),
        ],
        dim=1,
    )
    return grouped.reshape(-1, *rest).contiguous()


def _suffixes(bias: bool) -> tuple[str, ...]:
    return ("weight", "bias") if bias else ("weight",)


def llama_to_hf_state(model: dict[str, Tensor], saved_args: argparse.Namespace) -> dict[str, Tensor]:
    """Our TP-merged (SwiGLU halves [gate; up]) flat state dict -> LlamaForCausalLM's state dict (without
    lm_head.weight when tied). ToolError when a tensor is missing or left over."""
    heads, groups = saved_args.num_attention_heads, num_query_groups(saved_args)
    bias = getattr(saved_args, "add_bias_linear", True)
    ours = dict(model)
    hf = {"model.embed_tokens.weight": ours.pop(EMBEDDING)}
    try:
        for i in range(saved_args.num_layers):
            src, dst = f"{PREFIX}.{i}.", f"model.layers.{i}."
            hf[dst + "input_layernorm.weight"] = ours.pop(src + "input_layernorm.weight")
            hf[dst + "post_attention_layernorm.weight"] = ours.pop(src + "post_attention_layernorm.weight")
            for kind in _suffixes(bias):
                q, k, v = _qkv_to_hf(ours.pop(f"{src}self_attention.query_key_value.{kind}"), heads, groups)
                hf.update({f"{dst}self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v))})
                hf[f"{dst}self_attn.o_proj.{kind}"] = ours.pop(f"{src}self_attention.dense.{kind}")
                gate, up = ours.pop(f"{src}mlp.dense_h_to_4h.{kind}").chunk(2, dim=0)
                hf[f"{dst}mlp.gate_proj.{kind}"], hf[f"{dst}mlp.up_proj.{kind}"] = gate, up
                hf[f"{dst}mlp.down_proj.{kind}"] = ours.pop(f"{src}mlp.dense_4h_to_h.{kind}")
        hf["model.norm.weight"] = ours.pop(FINAL_NORM)
    except KeyError as e:
        raise ToolError(f"the checkpoint is not a Llama-shaped model of these args: no tensor {e}") from None
    if OUTPUT_LAYER in ours:
        hf["lm_head.weight"] = ours.pop(OUTPUT_LAYER)
    if ours:
        raise ToolError(f"the checkpoint holds tensors LlamaForCausalLM has no place for: {sorted(ours)[:5]}")
    return {name: t.contiguous() for name, t in hf.items()}


def hf_to_llama_state(hf: dict[str, Tensor], config: LlamaConfig) -> dict[str, Tensor]:
    """LlamaForCausalLM's state dict -> our flat state dict (SwiGLU [gate; up], QKV per query group).
    With tied embeddings lm_head.weight may be absent or must equal embed_tokens; rotary buffers are ignored."""
    theirs = {n: t for n, t in hf.items() if not n.endswith("rotary_emb.inv_freq")}
    heads, groups = config.num_attention_heads, config.num_key_value_heads
    bias = bool(config.attention_bias)
    ours = {}
    try:
        ours[EMBEDDING] = theirs.pop("model.embed_tokens.weight")
        for i in range(config.num_hidden_layers):
            src, dst = f"model.layers.{i}.", f"{PREFIX}.{i}."
            ours[dst + "input_layernorm.weight"] = theirs.pop(src + "input_layernorm.weight")
            for kind in _suffixes(bias):
                q, k, v = (theirs.pop(f"{src}self_attn.{n}_proj.{kind}") for n in "qkv")
                ours[f"{dst}self_attention.query_key_value.{kind}"] = _qkv_from_hf(q, k, v, heads, groups)
                ours[f"{dst}self_attention.dense.{kind}"] = theirs.pop(f"{src}self_attn.o_proj.{kind}")
            ours[dst + "post_attention_layernorm.weight"] = theirs.pop(
                src + "post_attention_layernorm.weight"
            )
            for kind in _suffixes(bias):
                gate, up = (theirs.pop(f"{src}mlp.{n}_proj.{kind}") for n in ("gate", "up"))
                ours[f"{dst}mlp.dense_h_to_4h.{kind}"] = torch.cat([gate, up]).contiguous()
                ours[f"{dst}mlp.dense_4h_to_h.{kind}"] = theirs.pop(f"{src}mlp.down_proj.{kind}")
        ours[FINAL_NORM] = theirs.pop("model.norm.weight")
    except KeyError as e:
        raise ToolError(f"not a LlamaForCausalLM state dict matching config.json: no tensor {e}") from None
    lm_head = theirs.pop("lm_head.weight", None)
    if not config.tie_word_embeddings:
        if lm_head is None:
            raise ToolError("tie_word_embeddings is false but the weights hold no lm_head.weight")
        ours[OUTPUT_LAYER] = lm_head
    elif lm_head is not None and not torch.equal(lm_head, ours[EMBEDDING]):
        raise ToolError(
            "tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight"
        )
    if theirs:
        raise ToolError(f"unexpected tensors for LlamaForCausalLM: {sorted(theirs)[:5]}")
    return ours
