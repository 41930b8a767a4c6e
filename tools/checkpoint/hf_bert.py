"""Our BERT -> Hugging Face `MegatronBertForPreTraining` (or `MegatronBertForMaskedLM` without a binary head).

Hugging Face's MegatronBert is Megatron's pre-LN BERT, the default of our BertModel: each layer computes
a = x + attn(LN(x)), y = a + mlp(LN(a)); there is no layernorm on the embeddings and a final layernorm
closes the encoder. (--apply-residual-connection-post-layernorm models are refused.)

    ours (flat, TP-merged)                                   HF (prefix "bert." for the model)
    language_model.embedding.word_embeddings.weight [V, h]   embeddings.word_embeddings.weight (decoder tied)
    language_model.embedding.position_embeddings.weight      embeddings.position_embeddings.weight
    language_model.embedding.tokentype_embeddings.weight     embeddings.token_type_embeddings.weight [2, h]
    language_model.encoder.layers.i.
        input_layernorm.*                                    encoder.layer.i.attention.ln.*
        self_attention.query_key_value.weight [3h, h]        encoder.layer.i.attention.self.{query,key,value}.weight
        self_attention.query_key_value.bias                  encoder.layer.i.attention.self.{query,key,value}.bias
        self_attention.dense.*                               encoder.layer.i.attention.output.dense.*
        post_attention_layernorm.*                           encoder.layer.i.ln.*
        mlp.dense_h_to_4h.*                                  encoder.layer.i.intermediate.dense.*
        mlp.dense_4h_to_h.*                                  encoder.layer.i.output.dense.*
    language_model.encoder.final_layernorm.*                 encoder.ln.*
    language_model.pooler.dense.*                            pooler.dense.*
    lm_head.dense.*                                          cls.predictions.transform.dense.*
    lm_head.layernorm.*                                      cls.predictions.transform.LayerNorm.*
    lm_head.bias [V]                                         cls.predictions.bias (= decoder.bias)
    binary_head.*                                            cls.seq_relationship.*

All are nn.Linear on both sides (no transposes). The fused QKV rows [heads, 3, head_dim] are reordered to
q | k | v blocks and cut into the three projections. The MLM head is LN(GeLU(dense(h))) E^T + b on both
sides and the next-sentence head a linear map of the pooled tanh(dense(h_[CLS])). The padded vocabulary
is kept (MLM logits equal ours column for column).
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor
from transformers import MegatronBertConfig

from tools.checkpoint.checkpoint_io import ToolError
from tools.checkpoint.hf_common import check_exportable, hf_activation, per_head_to_blocks

COPIED_NAMES = {  # ours -> HF (MegatronBertForPreTraining), copied as they are
    "language_model.embedding.word_embeddings.weight": "bert.embeddings.word_embeddings.weight",
    "language_model.embedding.position_embeddings.weight": "bert.embeddings.position_embeddings.weight",
    "language_model.embedding.tokentype_embeddings.weight": "bert.embeddings.token_type_embeddings.weight",
    "language_model.encoder.final_layernorm.weight": "bert.encoder.ln.weight",
    "language_model.encoder.final_layernorm.bias": "bert.encoder.ln.bias",
    "lm_head.dense.weight": "cls.predictions.transform.dense.weight",
    "lm_head.dense.bias": "cls.predictions.transform.dense.bias",
    "lm_head.layernorm.weight": "cls.predictions.transform.LayerNorm.weight",
    "lm_head.layernorm.bias": "cls.predictions.transform.LayerNorm.bias",
    "lm_head.bias": "cls.predictions.bias",
}
BINARY_HEAD_NAMES = {
    "language_model.pooler.dense.weight": "bert.pooler.dense.weight",
    "language_model.pooler.dense.bias": "bert.pooler.dense.bias",
    "binary_head.weight": "cls.seq_relationship.weight",
    "binary_head.bias": "cls.seq_relationship.bias",
}
LAYER_NAMES = {  # per layer, ours -> HF, copied as they are
    "input_layernorm.weight": "attention.ln.weight",
    "input_layernorm.bias": "attention.ln.bias",
    "self_attention.dense.weight": "attention.output.dense.weight",
    "self_attention.dense.bias": "attention.output.dense.bias",
    "post_attention_layernorm.weight": "ln.weight",
    "post_attention_layernorm.bias": "ln.bias",
    "mlp.dense_h_to_4h.weight": "intermediate.dense.weight",
    "mlp.dense_h_to_4h.bias": "intermediate.dense.bias",
    "mlp.dense_4h_to_h.weight": "output.dense.weight",
    "mlp.dense_4h_to_h.bias": "output.dense.bias",
}
QKV_PARTS = ("query", "key", "value")


def has_binary_head(model: dict[str, Tensor]) -> bool:
    return "binary_head.weight" in model


def megatron_bert_config_from_args(
    saved_args: argparse.Namespace, dtype: torch.dtype, binary_head: bool
) -> MegatronBertConfig:
    """The `transformers.MegatronBertConfig` of a BERT model with the saved `args`."""
    check_exportable(saved_args, "Hugging Face MegatronBert")
    return MegatronBertConfig(
        vocab_size=saved_args.padded_vocab_size,
        hidden_size=saved_args.hidden_size,
        num_hidden_layers=saved_args.num_layers,
        num_attention_heads=saved_args.num_attention_heads,
        intermediate_size=getattr(saved_args, "ffn_hidden_size", None) or 4 * saved_args.hidden_size,
        hidden_act=hf_activation(saved_args),
        hidden_dropout_prob=getattr(saved_args, "hidden_dropout", 0.1),
        attention_probs_dropout_prob=getattr(saved_args, "attention_dropout", 0.1),
        max_position_embeddings=saved_args.max_position_embeddings,
        type_vocab_size=2,
        initializer_range=getattr(saved_args, "init_method_std", 0.02),
        layer_norm_eps=getattr(saved_args, "layernorm_epsilon", 1e-5),
        architectures=["MegatronBertForPreTraining" if binary_head else "MegatronBertForMaskedLM"],
        torch_dtype=dtype,
    )


def bert_to_hf_state(model: dict[str, Tensor], num_layers: int, num_heads: int) -> dict[str, Tensor]:
    """Our TP-merged flat BERT state dict -> the HF state dict (the tied decoder weight left out)."""
    copied = dict(COPIED_NAMES)
    if has_binary_head(model):
        copied.update(BINARY_HEAD_NAMES)
    for i in range(num_layers):
        for ours, hf in LAYER_NAMES.items():
            copied[f"language_model.encoder.layers.{i}.{ours}"] = f"bert.encoder.layer.{i}.{hf}"
    qkv = {
        f"language_model.encoder.layers.{i}.self_attention.query_key_value.{kind}": (i, kind)
        for i in range(num_layers)
        for kind in ("weight", "bias")
    }
    expected = set(copied) | set(qkv)
    if set(model) != expected:
        raise ToolError(
            "the checkpoint is not a BERT model of this project: unexpected tensors "
            f"{sorted(set(model) - expected)[:5]}, missing {sorted(expected - set(model))[:5]}"
        )
    hf = {hf_name: model[ours].contiguous() for ours, hf_name in copied.items()}
    for ours, (i, kind) in qkv.items():
        blocks = per_head_to_blocks(model[ours], num_heads)
        for part, tensor in zip(QKV_PARTS, blocks.chunk(3, dim=0)):
            hf[f"bert.encoder.layer.{i}.attention.self.{part}.{kind}"] = tensor.contiguous()
    return hf
