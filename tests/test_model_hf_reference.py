"""Our GPT, BLOOM-style GPT (ALiBi + embedding layernorm) and BERT (original layernorm order) compute the
same outputs as the independent Hugging Face implementations, once the weights are renamed/re-laid out.

This checks the maths of the whole model end to end (attention scaling and masking, GeLU forms, layernorm
placement, ALiBi slopes, pooler and heads, tied decoders), not only its TP-consistency.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from megatron.parallel.state import single_process_state
from tests.test_model_common import build, tiny_config

transformers = pytest.importorskip("transformers")

BATCH, SEQ = 2, 10


def _split_qkv(weight: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Our fused QKV rows [heads, 3, head_dim] (weight [3p, h] or bias [3p]) -> q, k, v rows [heads * head_dim]."""
    grouped = weight.reshape(heads, 3, -1, *weight.shape[1:])
    return tuple(grouped[:, i].reshape(-1, *weight.shape[1:]) for i in range(3))


def _ids(vocab: int) -> Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))


def test_gpt_matches_hf_gpt2() -> None:
    config = tiny_config("gpt", openai_gelu=True)  # GPT-2's "gelu_new" is the tanh form
    model = build("gpt", config, single_process_state()).eval()
    ours = model.state_dict()
    hf_config = transformers.GPT2Config(
        vocab_size=config.padded_vocab_size,
        n_positions=config.max_position_embeddings,
        n_embd=config.hidden_size,
        n_layer=config.num_layers,
        n_head=config.num_attention_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=config.layernorm_epsilon,
    )
    hf = transformers.GPT2LMHeadModel(hf_config).eval()
    state = {
        "transformer.wte.weight": ours["language_model.embedding.word_embeddings.weight"],
        "transformer.wpe.weight": ours["language_model.embedding.position_embeddings.weight"],
        "transformer.ln_f.weight": ours["language_model.encoder.final_layernorm.weight"],
        "transformer.ln_f.bias": ours["language_model.encoder.final_layernorm.bias"],
        "lm_head.weight": ours["language_model.embedding.word_embeddings.weight"],
    }
    heads = config.num_attention_heads
    for n in range(config.num_layers):
        src, dst = f"language_model.encoder.layers.{n}.", f"transformer.h.{n}."
        qkv_w = _split_qkv(ours[src + "self_attention.query_key_value.weight"], heads)
        qkv_b = _split_qkv(ours[src + "self_attention.query_key_value.bias"], heads)
        state |= {  # GPT-2's Conv1D stores weights as [in, out]; its QKV output is [q | k | v]
            dst + "ln_1.weight": ours[src + "input_layernorm.weight"],
            dst + "ln_1.bias": ours[src + "input_layernorm.bias"],
            dst + "attn.c_attn.weight": torch.cat(qkv_w).t(),
            dst + "attn.c_attn.bias": torch.cat(qkv_b),
            dst + "attn.c_proj.weight": ours[src + "self_attention.dense.weight"].t(),
            dst + "attn.c_proj.bias": ours[src + "self_attention.dense.bias"],
            dst + "ln_2.weight": ours[src + "post_attention_layernorm.weight"],
            dst + "ln_2.bias": ours[src + "post_attention_layernorm.bias"],
            dst + "mlp.c_fc.weight": ours[src + "mlp.dense_h_to_4h.weight"].t(),
            dst + "mlp.c_fc.bias": ours[src + "mlp.dense_h_to_4h.bias"],
            dst + "mlp.c_proj.weight": ours[src + "mlp.dense_4h_to_h.weight"].t(),
            dst + "mlp.c_proj.bias": ours[src + "mlp.dense_4h_to_h.bias"],
        }
    hf.load_state_dict(state, strict=True)
    ids = _ids(config.padded_vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits
        logits = model(ids, torch.arange(SEQ).expand(BATCH, SEQ))
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_alibi_gpt_matches_hf_bloom() -> None:
    # 6 heads: not a power of two, so the interleaved extra slopes are exercised too.
    config = tiny_config(
        "gpt",
        hidden_size=48,
        num_attention_heads=6,
        position_embedding_type="alibi",
        embedding_layernorm=True,
        openai_gelu=True,
    )
    model = build("gpt", config, single_process_state()).eval()
    ours = model.state_dict()
    assert not any("position_embeddings" in key or "alibi" in key for key in ours)
    hf_config = transformers.BloomConfig(
        vocab_size=config.padded_vocab_size,
        hidden_size=config.hidden_size,
        n_layer=config.num_layers,
        n_head=config.num_attention_heads,
        layer_norm_epsilon=config.layernorm_epsilon,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    hf = transformers.BloomForCausalLM(hf_config).eval()
    state = {
        "transformer.word_embeddings.weight": ours["language_model.embedding.word_embeddings.weight"],
        "transformer.word_embeddings_layernorm.weight": ours[
            "language_model.embedding.embedding_layernorm.weight"
        ],
        "transformer.word_embeddings_layernorm.bias": ours[
            "language_model.embedding.embedding_layernorm.bias"
        ],
        "transformer.ln_f.weight": ours["language_model.encoder.final_layernorm.weight"],
        "transformer.ln_f.bias": ours["language_model.encoder.final_layernorm.bias"],
        "lm_head.weight": ours["language_model.embedding.word_embeddings.weight"],
    }
    for key, value in ours.items():  # BLOOM's layer names are Megatron's, and so is its QKV row order
        if key.startswith("language_model.encoder.layers."):
            state[key.replace("language_model.encoder.layers.", "transformer.h.")] = value
    hf.load_state_dict(state, strict=True)
    ids = _ids(config.padded_vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits
        logits = model(ids, None)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_bert_post_layernorm_order_matches_hf_bert() -> None:
    """With apply_residual_connection_post_layernorm, layer n's input layernorm plays the part of HF's
    embedding layernorm (n = 0) or of layer n-1's output layernorm, and the final layernorm that of the
    last layer's output layernorm."""
    config = tiny_config("bert", apply_residual_connection_post_layernorm=True)
    model = build("bert", config, single_process_state()).eval()
    ours = model.state_dict()
    hf_config = transformers.BertConfig(
        vocab_size=config.padded_vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.ffn_hidden_size,
        max_position_embeddings=config.max_position_embeddings,
        type_vocab_size=config.num_tokentypes,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=config.layernorm_epsilon,
        hidden_act="gelu",
    )
    hf = transformers.BertForPreTraining(hf_config).eval()
    layers = "language_model.encoder.layers."

    def layernorm(dst: str, src: str) -> dict[str, Tensor]:
        return {dst + ".weight": ours[src + ".weight"], dst + ".bias": ours[src + ".bias"]}

    state = {
        "bert.embeddings.word_embeddings.weight": ours["language_model.embedding.word_embeddings.weight"],
        "bert.embeddings.position_embeddings.weight": ours[
            "language_model.embedding.position_embeddings.weight"
        ],
        "bert.embeddings.token_type_embeddings.weight": ours[
            "language_model.embedding.tokentype_embeddings.weight"
        ],
        "bert.pooler.dense.weight": ours["language_model.pooler.dense.weight"],
        "bert.pooler.dense.bias": ours["language_model.pooler.dense.bias"],
        "cls.predictions.bias": ours["lm_head.bias"],
        "cls.predictions.decoder.weight": ours["language_model.embedding.word_embeddings.weight"],
        "cls.predictions.decoder.bias": ours["lm_head.bias"],
        "cls.predictions.transform.dense.weight": ours["lm_head.dense.weight"],
        "cls.predictions.transform.dense.bias": ours["lm_head.dense.bias"],
        "cls.seq_relationship.weight": ours["binary_head.weight"],
        "cls.seq_relationship.bias": ours["binary_head.bias"],
    }
    state |= layernorm("cls.predictions.transform.LayerNorm", "lm_head.layernorm")
    state |= layernorm("bert.embeddings.LayerNorm", layers + "0.input_layernorm")
    heads = config.num_attention_heads
    for n in range(config.num_layers):
        src, dst = f"{layers}{n}.", f"bert.encoder.layer.{n}."
        for name, w, b in zip(
            ("query", "key", "value"),
            _split_qkv(ours[src + "self_attention.query_key_value.weight"], heads),
            _split_qkv(ours[src + "self_attention.query_key_value.bias"], heads),
        ):
            state |= {f"{dst}attention.self.{name}.weight": w, f"{dst}attention.self.{name}.bias": b}
        state |= {
            dst + "attention.output.dense.weight": ours[src + "self_attention.dense.weight"],
            dst + "attention.output.dense.bias": ours[src + "self_attention.dense.bias"],
            dst + "intermediate.dense.weight": ours[src + "mlp.dense_h_to_4h.weight"],
            dst + "intermediate.dense.bias": ours[src + "mlp.dense_h_to_4h.bias"],
            dst + "output.dense.weight": ours[src + "mlp.dense_4h_to_h.weight"],
            dst + "output.dense.bias": ours[src + "mlp.dense_4h_to_h.bias"],
        }
        state |= layernorm(dst + "attention.output.LayerNorm", src + "post_attention_layernorm")
        next_norm = (
            f"{layers}{n + 1}.input_layernorm"
            if n + 1 < config.num_layers
            else "language_model.encoder.final_layernorm"
        )
        state |= layernorm(dst + "output.LayerNorm", next_norm)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in key or "token_type_ids" in key for key in missing), (
        missing
    )

    ids = _ids(config.padded_vocab_size)
    padding = torch.ones(BATCH, SEQ, dtype=torch.long)
    padding[1, -3:] = 0
    tokentypes = (torch.arange(SEQ) >= 4).long().expand(BATCH, SEQ)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=padding, token_type_ids=tokentypes)
        logits, binary = model(ids, padding, tokentypes)
    real = padding.bool()  # outputs at padded positions are unspecified
    torch.testing.assert_close(logits[real], expected.prediction_logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(binary, expected.seq_relationship_logits, rtol=1e-5, atol=1e-5)
