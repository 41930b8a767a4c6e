"""The Llama-shaped GPT (RoPE, RMSNorm, SwiGLU, grouped-query attention with 2 groups of 4 heads, untied
output layer, no biases) under tensor parallelism equals one process: TP-independent init in Megatron's
layouts, logits, losses and every gradient with every parameter randomised; exactly two all-reduces per
layer forward and two backward (all torch.distributed calls counted); KV-cache greedy generation equals
step-by-step argmax at TP 1 and 2; RoPE follows the position ids (reset per document)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from megatron.batch_utils import get_ltor_masks_and_position_ids
from megatron.model import GPTModel
from megatron.model.transformer import InferenceParams
from megatron.parallel.random import model_parallel_seed
from megatron.parallel.state import ParallelState, initialize_model_parallel, single_process_state
from megatron.text_generation import generate
from tests.collectives import count_collectives
from tests.distributed_utils import run_distributed
from tests.test_generation import GREEDY
from tests.test_model_common import VOCAB, assert_close_rel, fixed_inputs, tiny_config
from tools.checkpoint.tp_layout import split_whole

LLAMA = dict(
    position_embedding_type="rope",
    normalization="RMSNorm",
    layernorm_epsilon=1e-6,
    swiglu=True,
    ffn_hidden_size=48,
    num_query_groups=2,
    add_bias_linear=False,
    untie_embeddings_and_output_weights=True,
)


def llama_model(
    parallel: ParallelState, seed: int = 1234, parallel_output: bool = True, **overrides
) -> GPTModel:
    """The Llama-shaped tiny GPT (2 layers, h 32, 4 heads in 2 query groups, ffn 48, V 64), seeded."""
    model_parallel_seed(seed, parallel)
    return GPTModel(tiny_config("gpt", **{**LLAMA, **overrides}), parallel, parallel_output)


def shard(full: Tensor, name: str, parallel: ParallelState, swiglu: bool = True) -> Tensor:
    """This rank's part of a TP = 1 tensor in the checkpoint layout (SwiGLU: [gate slice; up slice])."""
    return split_whole({name: full}, parallel.tp_size, swiglu=swiglu)[parallel.tp_rank][name]


def randomise(model: GPTModel) -> None:
    """Every parameter away from its init, norm weights included (seeded, the same on every rank)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            offset = 1.0 if "layernorm" in name else 0.0
            param.copy_(torch.randn(param.shape, generator=g) * 0.3 + offset)


# Other combinations of the flags: biases, LayerNorm + GeLU with partial rotary, tied; MHA-as-GQA with ALiBi.
VARIANTS = [
    dict(add_bias_linear=True, normalization="LayerNorm", swiglu=False, rotary_percent=0.5,
         untie_embeddings_and_output_weights=False),
    dict(num_query_groups=4, position_embedding_type="alibi"),
]  # fmt: skip


def _check_tp_equals_single(parallel: ParallelState, **overrides) -> None:
    reference, model = llama_model(single_process_state(), **overrides), llama_model(parallel, **overrides)
    ref_params = dict(reference.named_parameters())
    swiglu = overrides.get("swiglu", True)
    assert list(ref_params) == [name for name, _ in model.named_parameters()]
    if not overrides:
        assert (
            not any(n.endswith(".bias") for n in ref_params)
            and "language_model.output_layer.weight" in ref_params
        )
    for name, param in model.named_parameters():  # the same seed gives the same model at any TP size
        assert torch.equal(param, shard(ref_params[name], name, parallel, swiglu)), name

    randomise(reference)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(shard(ref_params[name], name, parallel, swiglu))
    inputs = fixed_inputs("gpt")
    ids, positions, labels, weights = (
        inputs["ids"],
        inputs["position_ids"],
        inputs["labels"],
        inputs["weights"],
    )
    ref_logits = reference(ids, positions)
    with count_collectives() as calls:
        logits = model(ids, positions)
    layers = len(reference.language_model.encoder.layers)
    assert dict(calls) == {"all_reduce": 2 * layers + 1}, calls  # + the vocab-parallel embedding's g
    vocab_shard = torch.chunk(ref_logits, parallel.tp_size, dim=-1)[parallel.tp_rank]
    assert_close_rel(logits, vocab_shard, what="logits")
    with count_collectives() as calls:
        (logits * torch.linspace(0.5, 1.5, logits.size(-1))).sum().backward()
    assert dict(calls) == {"all_reduce": 2 * layers + 1}, calls  # + the output layer's f

    ref_loss, loss = reference(ids, positions, labels=labels), model(ids, positions, labels=labels)
    assert_close_rel(loss, ref_loss, what="per-token loss")
    reference.zero_grad(), model.zero_grad()
    (ref_loss * weights).sum().backward()
    (loss * weights).sum().backward()
    for name, param in model.named_parameters():
        assert_close_rel(
            param.grad, shard(ref_params[name].grad, name, parallel, swiglu), what=f"grad of {name}"
        )


def _check_one_layer_collectives(parallel: ParallelState) -> None:
    model = llama_model(parallel)
    layer = model.language_model.encoder.layers[0]
    rotary = model.language_model.rotary_pos_emb(torch.arange(8).expand(2, 8))
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(4), requires_grad=True)
    with count_collectives() as forward:
        out = layer(x, None, None, rotary)
    with count_collectives() as backward:
        out.square().sum().backward()
    assert (dict(forward), dict(backward)) == ({"all_reduce": 2}, {"all_reduce": 2})


def _greedy_without_cache(model: GPTModel, prompt: list[int], new_tokens: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(torch.tensor([tokens]), torch.arange(len(tokens))[None])[0, -1, :VOCAB]
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt) :]


def _check_generation(parallel: ParallelState) -> list[list[int]]:
    model = llama_model(parallel, parallel_output=False, init_method_std=0.3).eval()
    prompts = [[3, 17, 5, 42, 8], [11, 2, 9]]
    out = generate(model, prompts, 10, parallel, GREEDY, vocab_size=VOCAB)
    for row, prompt in enumerate(prompts):
        expected = _greedy_without_cache(model, prompt, 10)
        assert out.generated()[row] == expected, (row, out.generated()[row], expected)
        assert len(set(expected)) >= 3
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    cache = InferenceParams(max_batch_size=2, max_sequence_length=12)
    with torch.no_grad():
        full = model(tokens, torch.arange(12).expand(2, 12))
        for start, end in [(0, 5), (5, 7)] + [(t, t + 1) for t in range(7, 12)]:
            step = model(
                tokens[:, start:end], torch.arange(start, end).expand(2, end - start), inference_params=cache
            )
            assert_close_rel(step, full[:, start:end], what=f"cached logits {start}:{end}")
    keys, _ = cache.key_value_memory_dict[0]
    assert keys.shape[1] == 2 // parallel.tp_size  # the cache holds this rank's query groups, not its heads
    return out.rows()


def _on_rank(rank: int, world_size: int, tp: int) -> list[list[int]]:
    parallel = initialize_model_parallel(tp)
    _check_tp_equals_single(parallel)
    for overrides in VARIANTS:
        _check_tp_equals_single(parallel, **overrides)
    _check_one_layer_collectives(parallel)
    return _check_generation(parallel)


def test_llama_tp2_equals_single_process_and_generates_like_tp1():
    single = _check_generation(single_process_state())
    for rows in run_distributed(_on_rank, 2, args=(2,)):
        assert rows == single


def test_rope_follows_reset_position_ids():
    """Two documents packed in one sample with reset positions and attention mask: the second document's
    logits equal those of the document alone at positions 0.. (RoPE reads the position ids)."""
    model = llama_model(single_process_state()).eval()
    randomise(model)
    eod = 0
    first, second = [5, 9, 3, eod], [7, 11, 2, 8, 6]
    tokens = torch.tensor([first + second])
    mask, _, positions = get_ltor_masks_and_position_ids(tokens, eod, True, True, False)
    assert positions.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 4]]
    with torch.no_grad():
        packed = model(tokens, positions, mask)
        alone = model(torch.tensor([second]), torch.arange(5)[None])
        shifted = model(torch.tensor([second]), torch.arange(4, 9)[None])
        spread = model(torch.tensor([second]), torch.arange(0, 10, 2)[None])
    assert_close_rel(packed[0, 4:], alone[0], what="second document")
    assert_close_rel(shifted, alone, what="positions shifted by 4")  # RoPE scores depend on i - j only
    assert not torch.allclose(spread, alone, atol=1e-3)  # ... and do depend on i - j


@pytest.mark.parametrize("kv_channels, percent", [(8, 0.5), (8, 1.0)])
def test_rotary_matches_explicit_rotation(kv_channels, percent):
    """apply_rotary_pos_emb against an independent complex-number rotation of the pairs (x_i, x_{i+r/2})."""
    from megatron.model.rotary import RotaryEmbedding, apply_rotary_pos_emb

    r = int(kv_channels * percent)
    x = torch.randn(2, 3, 5, kv_channels, dtype=torch.float64).float()
    positions = torch.tensor([[0, 1, 2, 7, 100], [3, 3, 4, 0, 1]])
    out = apply_rotary_pos_emb(x, RotaryEmbedding(kv_channels, percent, 10000)(positions))
    freqs = 10000.0 ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    angles = positions[:, None, :, None].double() * freqs  # [b, 1, s, r/2]
    pairs = torch.complex(x[..., : r // 2].double(), x[..., r // 2 : r].double()) * torch.exp(1j * angles)
    expected = torch.cat([pairs.real, pairs.imag, x[..., r:].double()], dim=-1).float()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_recompute_gives_the_same_gradients_with_rope():
    """Full and selective recompute replay the layer with the same rotary angles: identical gradients."""
    inputs = fixed_inputs("gpt")
    grads = {}
    for granularity in (None, "full", "selective"):
        model = llama_model(single_process_state(), recompute_granularity=granularity)
        randomise(model)
        loss = model(inputs["ids"], inputs["position_ids"], labels=inputs["labels"])
        (loss * inputs["weights"]).sum().backward()
        grads[granularity] = {name: p.grad for name, p in model.named_parameters()}
    for granularity in ("full", "selective"):
        for name, grad in grads[None].items():
            torch.testing.assert_close(grads[granularity][name], grad, rtol=1e-6, atol=1e-7, msg=name)
