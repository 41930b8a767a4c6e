"""GPT and BERT under tensor parallelism equal the single-process model: init, then (with every parameter
randomised) logits, loss and all gradients per element; exactly two all-reduces over the TP group forward
and two backward per layer and no other collective (every torch.distributed call is recorded); dropout streams inside and outside TP regions;
activation recompute with dropout at TP = 2. Runs on gloo processes (world 2 and 4, TP 1/2/4 x DP 1/2)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron.model.transformer import CoreAttention, ParallelTransformerLayer
from megatron.parallel.random import model_parallel_seed
from megatron.parallel.state import ParallelState, initialize_model_parallel, single_process_state
from tests.collectives import group_ranks, record_collectives
from tests.distributed_utils import run_distributed
from tests.randomize import randomize_parameters_
from tests.test_model_common import (
    assert_close_rel,
    build,
    fixed_inputs,
    forward,
    tiny_config,
    tp_shard,
    weighted_loss,
)

# (model kind, config overrides): the plain models and the variants whose TP behaviour differs.
CASES = [
    ("gpt", {}),
    ("gpt", {"position_embedding_type": "alibi", "embedding_layernorm": True, "openai_gelu": True}),
    ("bert", {}),
    ("bert", {"apply_residual_connection_post_layernorm": True, "position_embedding_type": "alibi"}),
    ("bert", {"add_binary_head": False}),
]


def _check_against_tp1(kind: str, overrides: dict, parallel: ParallelState) -> None:
    config = tiny_config(kind, **overrides)
    label = f"{kind} {overrides} tp={parallel.tp_size}"
    reference = build(kind, config, single_process_state())
    model = build(kind, config, parallel)
    ref_params = dict(reference.named_parameters())
    assert [name for name, _ in model.named_parameters()] == list(ref_params)

    for name, param in model.named_parameters():  # TP-independent init: shards are slices of TP=1 weights
        torch.testing.assert_close(param, tp_shard(ref_params[name], name, parallel), rtol=0, atol=0)

    # Fresh biases are 0 and norm weights 1: randomise everything so a misplaced bias or norm shows.
    randomize_parameters_(reference, seed=5)
    randomize_parameters_(model, seed=5, parallel=parallel)
    inputs = fixed_inputs(kind)
    ref_logits, ref_binary = forward(kind, reference, inputs, with_labels=False)
    logits, binary = forward(kind, model, inputs, with_labels=False)
    assert logits.shape[-1] == config.padded_vocab_size // parallel.tp_size
    vocab_shard = torch.chunk(ref_logits, parallel.tp_size, dim=-1)[parallel.tp_rank]
    assert_close_rel(logits, vocab_shard, what=f"{label} logits")
    if ref_binary is not None:
        assert_close_rel(binary, ref_binary, what=f"{label} binary logits")

    full_model = build(kind, config, parallel, parallel_output=False)
    randomize_parameters_(full_model, seed=5, parallel=parallel)
    full_logits, _ = forward(kind, full_model, inputs, with_labels=False)
    assert_close_rel(full_logits, ref_logits, what=f"{label} gathered logits")

    ref_loss, _ = forward(kind, reference, inputs, with_labels=True)
    loss, _ = forward(kind, model, inputs, with_labels=True)
    assert loss.dtype == torch.float32 and loss.shape == inputs["ids"].shape
    assert_close_rel(loss, ref_loss, what=f"{label} loss")

    weighted_loss(kind, reference, inputs).backward()
    with record_collectives() as calls:
        total = weighted_loss(kind, model, inputs)
        forward_calls = list(calls)
        total.backward()
    for name, param in model.named_parameters():
        expected = tp_shard(ref_params[name].grad, name, parallel)
        assert_close_rel(param.grad, expected, what=f"{label} grad of {name}")
    _check_collectives(forward_calls, calls[len(forward_calls) :], config, inputs, parallel)


def _check_collectives(forward_calls: list, backward_calls: list, config, inputs: dict, parallel) -> None:
    """Forward: the embedding's g + 2 per layer (activation-sized) and the cross entropy's 3 per-token
    all-reduces; backward: 2 per layer + the tied logits' f. All over the TP group; nothing at TP = 1."""
    if parallel.tp_size == 1:
        assert forward_calls == [] and backward_calls == []
        return
    tokens = inputs["ids"].numel()
    activation = ("all_reduce", group_ranks(parallel.tp_group), tokens * config.hidden_size)
    per_token = ("all_reduce", group_ranks(parallel.tp_group), tokens)
    layers = 2 * config.num_layers + 1
    assert sorted((c.name, c.ranks, c.numel) for c in forward_calls) == sorted(
        [activation] * layers + [per_token] * 3
    ), forward_calls
    assert [(c.name, c.ranks, c.numel) for c in backward_calls] == [activation] * layers, backward_calls


def _tp_equivalence(rank: int, world_size: int, grids: list[tuple[int, list[tuple[str, dict]]]]) -> None:
    for tp, cases in grids:  # one spawn can build several grids: groups are created per call
        parallel = initialize_model_parallel(tp)
        assert parallel.tp_size == tp and parallel.dp_size == world_size // tp
        for kind, overrides in cases:
            _check_against_tp1(kind, overrides, parallel)


@pytest.mark.parametrize(
    "world_size, grids",
    [(2, [(2, CASES)]), (4, [(4, CASES), (2, [CASES[0], CASES[2]])])],  # TP 2 x DP 2: plain GPT and BERT
    ids=["tp2", "tp4-and-tp2xdp2"],
)
def test_models_match_single_process(
    world_size: int, grids: list[tuple[int, list[tuple[str, dict]]]]
) -> None:
    run_distributed(_tp_equivalence, world_size, args=(grids,))


def _gather(x: torch.Tensor, parallel: ParallelState) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(parallel.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=parallel.tp_group)
    return parts


def _dropout_and_all_reduces(rank: int, world_size: int) -> None:
    parallel = initialize_model_parallel(2)
    config = tiny_config("gpt", hidden_dropout=0.5, attention_dropout=0.5)
    model_parallel_seed(7, parallel)

    # Inside a TP region (attention probabilities of this rank's heads): masks differ across TP ranks.
    core = CoreAttention(config, parallel, causal=True)
    q = torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(3))
    dropped = core(q, q, q, None)
    core.eval()
    assert not torch.equal(dropped, core(q, q, q, None)), "attention dropout is not active"
    mine, other = _gather(dropped, parallel)[rank % 2], _gather(dropped, parallel)[1 - rank % 2]
    assert not torch.equal(mine, other), "attention dropout masks are identical on the two TP ranks"

    # Outside TP regions (residual stream): the same mask on every TP rank, so the copies stay identical.
    layer = ParallelTransformerLayer(config, parallel, causal=True)
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(4), requires_grad=True)
    tp_all_reduce = ("all_reduce", group_ranks(parallel.tp_group))
    with record_collectives() as calls:
        out = layer(x, None)
        assert [(c.name, c.ranks) for c in calls] == [tp_all_reduce] * 2
        out.square().sum().backward()
    assert [(c.name, c.ranks) for c in calls] == [tp_all_reduce] * 4
    first, second = _gather(out.detach(), parallel)
    assert torch.equal(first, second), "TP ranks' copies of the residual stream diverged"
    layer.self_attention.core_attention.eval()  # only the hidden dropout stays on
    hidden_dropped = layer(x, None)
    layer.eval()
    assert not torch.equal(hidden_dropped, layer(x, None)), "hidden dropout is not active"

    # Recompute replays both RNG streams: same gradients as without recompute, dropout on.
    inputs = fixed_inputs("gpt")
    grads = {}
    for granularity in (None, "full", "selective"):
        model = build(
            "gpt",
            tiny_config("gpt", hidden_dropout=0.3, attention_dropout=0.3, recompute_granularity=granularity),
            parallel,
        )
        weighted_loss("gpt", model, inputs).backward()
        grads[granularity] = {name: p.grad for name, p in model.named_parameters()}
    for granularity in ("full", "selective"):
        for name, grad in grads[None].items():
            torch.testing.assert_close(
                grads[granularity][name], grad, rtol=1e-6, atol=1e-7, msg=f"{granularity} {name}"
            )


def test_dropout_streams_all_reduce_counts_and_recompute_at_tp2() -> None:
    run_distributed(_dropout_and_all_reduces, 2)
