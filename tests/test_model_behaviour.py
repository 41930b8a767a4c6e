"""Single-process behaviour of the models: state-dict contract, masking (causal, documents, padding),
recompute (same gradients with dropout, fewer saved activations), ALiBi slopes, init, dtypes, errors."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from megatron.model.utils import alibi_slopes, gelu
from megatron.parallel.state import ParallelState, single_process_state
from tests.test_model_common import VOCAB, build, fixed_inputs, tiny_config, weighted_loss

SINGLE = single_process_state()


def _fake_tp_state(tp_rank: int, tp_size: int) -> ParallelState:
    """A TP rank without process groups: enough to build the shards (forward would not communicate)."""
    return ParallelState(tp_group=None, dp_group=None, tp_rank=tp_rank, tp_size=tp_size, dp_rank=0, dp_size=1)


def _layer_keys(n: int) -> list[str]:
    prefix = f"language_model.encoder.layers.{n}."
    names = [
        "input_layernorm",
        "self_attention.query_key_value",
        "self_attention.dense",
        "post_attention_layernorm",
        "mlp.dense_h_to_4h",
        "mlp.dense_4h_to_h",
    ]
    return [f"{prefix}{name}.{p}" for name in names for p in ("weight", "bias")]


def _expected_keys(kind: str, num_layers: int = 2) -> list[str]:
    keys = [
        "language_model.embedding.word_embeddings.weight",
        "language_model.embedding.position_embeddings.weight",
    ]
    if kind == "bert":
        keys.append("language_model.embedding.tokentype_embeddings.weight")
    for n in range(num_layers):
        keys += _layer_keys(n)
    keys += ["language_model.encoder.final_layernorm.weight", "language_model.encoder.final_layernorm.bias"]
    if kind == "bert":
        keys += ["language_model.pooler.dense.weight", "language_model.pooler.dense.bias", "lm_head.bias"]
        keys += [
            "lm_head.dense.weight",
            "lm_head.dense.bias",
            "lm_head.layernorm.weight",
            "lm_head.layernorm.bias",
        ]
        keys += ["binary_head.weight", "binary_head.bias"]
    return keys


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_state_dict_names_and_shapes_of_a_tp_shard(kind: str) -> None:
    h, ffn, v, tp = 32, 128, VOCAB, 2
    state = build(kind, tiny_config(kind), _fake_tp_state(1, tp)).state_dict()
    assert sorted(state) == sorted(_expected_keys(kind))
    layer = "language_model.encoder.layers.1."
    shapes = {
        "language_model.embedding.word_embeddings.weight": (v // tp, h),
        "language_model.embedding.position_embeddings.weight": (16, h),
        layer + "self_attention.query_key_value.weight": (3 * h // tp, h),
        layer + "self_attention.query_key_value.bias": (3 * h // tp,),
        layer + "self_attention.dense.weight": (h, h // tp),
        layer + "self_attention.dense.bias": (h,),
        layer + "mlp.dense_h_to_4h.weight": (ffn // tp, h),
        layer + "mlp.dense_h_to_4h.bias": (ffn // tp,),
        layer + "mlp.dense_4h_to_h.weight": (h, ffn // tp),
        layer + "mlp.dense_4h_to_h.bias": (h,),
        layer + "input_layernorm.weight": (h,),
    }
    if kind == "bert":
        shapes |= {
            "language_model.embedding.tokentype_embeddings.weight": (2, h),
            "lm_head.bias": (v // tp,),
            "lm_head.dense.weight": (h, h),
            "binary_head.weight": (2, h),
        }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key


def test_variants_change_only_the_expected_state_dict_keys() -> None:
    config = tiny_config("gpt", position_embedding_type="alibi", embedding_layernorm=True)
    keys = set(build("gpt", config, SINGLE).state_dict())  # ALiBi slopes are a non-persistent buffer
    expected = set(_expected_keys("gpt")) - {"language_model.embedding.position_embeddings.weight"}
    expected |= {
        "language_model.embedding.embedding_layernorm.weight",
        "language_model.embedding.embedding_layernorm.bias",
    }
    assert keys == expected
    bert_keys = set(build("bert", tiny_config("bert", add_binary_head=False), SINGLE).state_dict())
    assert bert_keys == set(_expected_keys("bert")) - {
        "language_model.pooler.dense.weight",
        "language_model.pooler.dense.bias",
        "binary_head.weight",
        "binary_head.bias",
    }


@pytest.mark.parametrize("overrides", [{}, {"position_embedding_type": "alibi"}])
def test_gpt_future_tokens_do_not_change_past_logits(overrides: dict) -> None:
    model = build("gpt", tiny_config("gpt", **overrides), SINGLE).eval()
    inputs = fixed_inputs("gpt")
    ids, positions = inputs["ids"], inputs["position_ids"]
    changed = ids.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids, positions), model(changed, positions)
    torch.testing.assert_close(after[:, :5], before[:, :5], rtol=1e-6, atol=1e-6)
    assert (after[:, 5:] - before[:, 5:]).abs().max() > 1e-2


@pytest.mark.parametrize("overrides", [{}, {"position_embedding_type": "alibi"}])
def test_gpt_document_attention_mask(overrides: dict) -> None:
    """Megatron's reset-attention-mask: two documents in one sample behave as two separate samples."""
    model = build("gpt", tiny_config("gpt", **overrides), SINGLE).eval()
    ids = fixed_inputs("gpt")["ids"][:1]
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    same_document = torch.zeros(8, 8, dtype=torch.bool)
    same_document[:4, :4] = same_document[4:, 4:] = True
    masked = ~(same_document & torch.ones(8, 8, dtype=torch.bool).tril())  # True = not allowed
    with torch.no_grad():
        joint = model(ids, positions, attention_mask=masked[None, None])
        first = model(ids[:, :4], positions[:, :4])
        second = model(ids[:, 4:], positions[:, 4:])
    torch.testing.assert_close(joint, torch.cat([first, second], dim=1), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="bool"):
        model(ids, positions, attention_mask=masked.float()[None, None])


def test_bert_padding_is_ignored_and_attention_is_bidirectional() -> None:
    model = build("bert", tiny_config("bert"), SINGLE).eval()
    ids = fixed_inputs("bert")["ids"][:1]
    tokentypes = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0]])
    padding = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        padded, padded_binary = model(ids, padding, tokentypes)
        alone, alone_binary = model(ids[:, :6], padding[:, :6], tokentypes[:, :6])
        changed = ids.clone()
        changed[0, 5] = (changed[0, 5] + 1) % VOCAB
        later_changed, _ = model(changed, padding, tokentypes)
    torch.testing.assert_close(padded[:, :6], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_binary, alone_binary, rtol=1e-5, atol=1e-5)
    assert (later_changed[0, 0] - padded[0, 0]).abs().max() > 1e-3  # a later token changes the first output


def _saved_activation_bytes(kind: str, model: torch.nn.Module, inputs: dict[str, Tensor]) -> int:
    """Bytes of tensors autograd keeps from the forward pass for backward; runs the backward too."""
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = weighted_loss(kind, model, inputs)
    loss.backward()
    return saved


@pytest.mark.parametrize("kind", ["gpt", "bert"])
def test_recompute_gives_the_same_gradients_with_dropout_and_saves_less(kind: str) -> None:
    inputs = fixed_inputs(kind, seq=16)
    grads, saved = {}, {}
    for granularity in (None, "selective", "full"):
        config = tiny_config(
            kind, hidden_dropout=0.2, attention_dropout=0.2, recompute_granularity=granularity
        )
        model = build(kind, config, SINGLE)
        saved[granularity] = _saved_activation_bytes(kind, model, inputs)
        grads[granularity] = {name: p.grad for name, p in model.named_parameters()}
    assert saved["full"] < saved["selective"] < saved[None]
    for granularity in ("selective", "full"):
        for name, grad in grads[None].items():
            torch.testing.assert_close(
                grads[granularity][name], grad, rtol=1e-6, atol=1e-7, msg=f"{granularity} {name}"
            )
    # Dropout is really on: a different seed gives different gradients.
    same_weights = build(kind, tiny_config(kind), SINGLE).state_dict()
    other = build(kind, tiny_config(kind, hidden_dropout=0.2, attention_dropout=0.2), SINGLE, seed=99)
    other.load_state_dict(same_weights)
    weighted_loss(kind, other, inputs).backward()
    name = "language_model.encoder.layers.0.self_attention.query_key_value.weight"
    assert not torch.allclose(dict(other.named_parameters())[name].grad, grads[None][name])


@pytest.mark.parametrize("num_heads", [1, 4, 6, 8, 12, 16, 20])
def test_alibi_slopes_match_bloom(num_heads: int) -> None:
    modeling_bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    alibi = modeling_bloom.build_alibi_tensor(
        torch.ones(1, 2), num_heads, torch.float32
    )  # slope_h * position
    torch.testing.assert_close(alibi_slopes(num_heads), alibi[:, 0, 1], rtol=1e-6, atol=0)
    if num_heads == 8:
        assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]


def test_gelu_forms() -> None:
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    exact = x * 0.5 * (1 + torch.erf(x / 2**0.5))
    tanh = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
    torch.testing.assert_close(gelu(x, tanh_form=False), exact)
    torch.testing.assert_close(gelu(x, tanh_form=True), tanh)
    assert (exact - tanh).abs().max() > 1e-4  # the two forms are really different


def test_initialisation() -> None:
    config = tiny_config("bert", num_layers=4, hidden_size=64, init_method_std=0.02)
    params = dict(build("bert", config, SINGLE).named_parameters())
    output_std = 0.02 / (2 * 4) ** 0.5
    for name, param in params.items():
        if name.endswith("layernorm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
        elif name.endswith("bias"):
            assert torch.equal(param, torch.zeros_like(param)), name
        else:
            std = (
                output_std if name.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")) else 0.02
            )
            if param.numel() >= 4096:  # enough samples for a 5% estimate of the std
                assert abs(param.std().item() / std - 1) < 0.05, name
    assert config.output_layer_init_std == pytest.approx(output_std)


def test_fp32_residual_connection_with_bf16_parameters() -> None:
    inputs = fixed_inputs("gpt")
    reference = weighted_loss("gpt", build("gpt", tiny_config("gpt"), SINGLE), inputs)
    for fp32_residual in (False, True):
        config = tiny_config("gpt", params_dtype=torch.bfloat16, fp32_residual_connection=fp32_residual)
        model = build("gpt", config, SINGLE)
        dtypes = []
        model.language_model.encoder.layers[0].register_forward_hook(
            lambda module, args, out, seen=dtypes: seen.append(out.dtype)
        )
        logits = model(inputs["ids"], inputs["position_ids"])
        assert logits.dtype == torch.bfloat16
        assert dtypes == [torch.float32 if fp32_residual else torch.bfloat16]
        loss = weighted_loss("gpt", model, inputs)
        assert loss.dtype == torch.float32
        assert loss.item() == pytest.approx(reference.item(), rel=2e-2)
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize(
    "overrides, tp, message",
    [
        ({"num_attention_heads": 4}, 3, "--num-attention-heads"),
        ({"padded_vocab_size": 66}, 4, "padded vocabulary size"),
        ({"ffn_hidden_size": 98}, 4, "--ffn-hidden-size"),
        ({"recompute_granularity": "layers"}, 1, "--recompute-granularity"),
        ({"position_embedding_type": "xpos"}, 1, "--position-embedding-type"),
    ],
)
def test_config_errors_name_the_flag(overrides: dict, tp: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build("gpt", tiny_config("gpt", **overrides), _fake_tp_state(0, tp))
