"""Sequence parallelism: the same training as plain tensor parallelism, its collectives per layer, its
dropout streams under recompute and resume, and its argument checks."""

from __future__ import annotations

import os
import zlib

import pytest
import torch

import pretrain_bert
from megatron.arguments import parse_args
from megatron.model.config import TransformerConfig
from megatron.model.language_model import parallel_lm_logits
from megatron.model.transformer import ParallelTransformerLayer
from megatron.parallel.layers import ColumnParallelLinear
from megatron.parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.parallel.random import model_parallel_seed
from megatron.parallel.state import initialize_model_parallel
from tests.collectives import count_collectives
from tests.distributed_utils import run_distributed
from tests.training_compare import (
    ADAM_EPS,
    NO_DROPOUT,
    TINY,
    assert_curves_close,
    assert_params_close,
    randomise_,
    saved_params,
    train,
)

SP = ["--sequence-parallel"]
TP2 = ["--tensor-model-parallel-size", 2]


def _variants(rank: int, world_size: int, root: str, base: list, variants: dict[str, list]) -> dict:
    return {name: train([*base, *extra], save=os.path.join(root, name)) for name, extra in variants.items()}


def _compare(
    root: str,
    results: list[dict],
    pairs: dict[str, str],
    tp: int,
    rtol: float,
    param_rtol: float,
    atol: float = 1e-7,
) -> None:
    for name, reference in pairs.items():
        for rank_result in results:
            assert_curves_close(rank_result[name], rank_result[reference], rtol=rtol)
        for tp_rank in range(tp):
            assert_params_close(
                saved_params(os.path.join(root, name), tp_rank),
                saved_params(os.path.join(root, reference), tp_rank),
                rtol=param_rtol,
                atol=atol,
            )


def test_tp2_sequence_parallel_matches_tensor_parallel(tmp_path):
    """TP 2, dropout off: with sequence parallelism (plain, full and selective recompute) the loss curve and
    every final parameter equal plain TP's."""
    base = [*TINY, *NO_DROPOUT, *ADAM_EPS, *TP2, "--train-iters", 4, "--global-batch-size", 4]
    variants = {
        "tp": [],
        "sp": SP,
        "sp_full": [*SP, "--recompute-granularity", "full"],
        "sp_selective": [*SP, "--recompute-granularity", "selective"],
    }
    results = run_distributed(_variants, 2, args=(str(tmp_path), base, variants))
    pairs = {"sp": "tp", "sp_full": "tp", "sp_selective": "tp"}
    _compare(str(tmp_path), results, pairs, tp=2, rtol=1e-5, param_rtol=1e-5)


def _dropout_runs(rank: int, world_size: int, root: str) -> dict[str, list[float]]:
    base = [*TINY, *TP2, *SP, "--train-iters", 4, "--global-batch-size", 4]
    straight = train(base, save=os.path.join(root, "straight"))
    ckpt = os.path.join(root, "ckpt")
    first = train([*base, "--exit-interval", 2], save=ckpt)
    second = train(base, save=ckpt, load=ckpt)
    full = train([*base, "--recompute-granularity", "full"])
    return {"straight": straight, "resumed": first + second, "full": full}


def test_dropout_with_sequence_parallelism_resumes_bitwise_and_recompute_replays_it(tmp_path):
    """Dropout on: per-rank streams in the sequence-parallel regions are saved and restored exactly, and
    full recompute replays them (the same losses, bitwise)."""
    for result in run_distributed(_dropout_runs, 2, args=(str(tmp_path),)):
        assert result["resumed"] == result["straight"]
        assert result["full"] == result["straight"]


@pytest.mark.slow
def test_bert_sequence_parallel_matches_tensor_parallel(tmp_path):
    def curve(extra):
        return run_distributed(_bert_curve, 2, args=(extra,))[0]

    assert_curves_close(curve(SP), curve([]), rtol=1e-5)


def _bert_curve(rank: int, world_size: int, extra: list) -> list[float]:
    argv = [*TINY, *NO_DROPOUT, *TP2, *extra, "--train-iters", 4, "--global-batch-size", 4]
    summary = pretrain_bert.main([str(a) for a in argv])
    return [step[name] for step in summary["losses"] for name in ("lm loss", "sop loss")]


@pytest.mark.slow
def test_tp2_dp2_with_both_features_matches_plain(tmp_path):
    """TP 2 x DP 2: sequence parallelism + distributed optimizer vs neither, fp32 (1e-5) and bf16 (bf16
    tolerance: the reductions round differently in bf16, so gradients differ by ~1e-2 relative and a
    weight by up to about one Adam step, lr = 1e-3, after 4 steps)."""
    base = [*TINY, *NO_DROPOUT, *TP2, "--train-iters", 4, "--global-batch-size", 8, *ADAM_EPS]
    both = [*SP, "--use-distributed-optimizer"]
    variants = {"plain": [], "both": both, "plain_bf16": ["--bf16"], "both_bf16": [*both, "--bf16"]}
    results = run_distributed(_variants, 4, args=(str(tmp_path), base, variants))
    _compare(str(tmp_path), results, {"both": "plain"}, tp=2, rtol=1e-5, param_rtol=1e-5)
    _compare(str(tmp_path), results, {"both_bf16": "plain_bf16"}, tp=2, rtol=2e-2, param_rtol=2e-2, atol=1e-3)


# --- collectives per layer -----------------------------------------------------------------------------


def _layer_collectives_and_mappings(rank: int, world_size: int) -> dict[bool, tuple[dict, dict]]:
    parallel = initialize_model_parallel(2)
    _check_mappings(rank, world_size, parallel.tp_group)
    _check_column_parallel_regather(rank, parallel)
    return {sp: _count_layer_collectives(parallel, sp) for sp in (False, True)}


def _count_layer_collectives(parallel, sequence_parallel: bool) -> tuple[dict, dict]:
    model_parallel_seed(3, parallel)
    config = TransformerConfig(
        num_layers=1, hidden_size=16, num_attention_heads=4, padded_vocab_size=64, max_position_embeddings=8,
        hidden_dropout=0.1, attention_dropout=0.1, sequence_parallel=sequence_parallel,
    )  # fmt: skip
    layer = ParallelTransformerLayer(config, parallel, causal=True)
    randomise_(layer, parallel)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    if sequence_parallel:
        x = x.chunk(2, dim=1)[parallel.tp_rank].contiguous()
    x.requires_grad_(True)
    with count_collectives() as forward:
        y = layer(x, None)
    with count_collectives() as backward:
        y.square().sum().backward()
    return dict(forward), dict(backward)


def test_collectives_per_layer_and_the_mappings_maths():
    """Every torch.distributed call counted: plain TP 2 all-reduces each way; sequence parallelism 2
    all-gathers + 2 reduce-scatters each way and no all-reduce. (The same processes check the sequence
    mappings against independent computations: _check_mappings.)"""
    for counts in run_distributed(_layer_collectives_and_mappings, 2):
        assert counts[False] == ({"all_reduce": 2}, {"all_reduce": 2})
        forward = {"all_gather_single": 2, "reduce_scatter_single": 2}
        # Backward: the adjoints (2 reduce-scatters into the layernorms, 2 all-gathers out of the
        # row-parallel reduce-scatters) plus 2 all-gathers that re-gather the inputs of the two
        # column-parallel GEMMs (QKV, h -> 4h) for their weight gradients, as Megatron-LM does
        # (Korthikanti et al. 2022, sec. 4.2.2): those GEMMs keep s/t of their input, not s.
        backward = {"all_gather_single": 4, "reduce_scatter_single": 2}
        assert counts[True] == (forward, backward)


# --- the mappings against an independent computation ------------------------------------------------


def _check_column_parallel_regather(rank: int, parallel) -> None:
    """ColumnParallelLinear with sequence parallelism keeps only this rank's s/2 positions of its input
    (no other activation) and gives, bitwise, what all-gather then F.linear gives; both equal the
    computation on the whole sequence with each rank's weight slice (dL/dX_r: this rank's positions of
    the sum over ranks r' of dL/dY_r' W_r')."""
    generator = torch.Generator().manual_seed(4)
    whole = torch.randn(2, 8, 6, generator=generator)  # [batch, seq, in], the same on both ranks
    upstream = [torch.randn(2, 8, 5, generator=generator) for _ in range(2)]  # dL/dY_r of each rank
    for bias in (True, False):
        layer = ColumnParallelLinear(6, 10, parallel=parallel, bias=bias, sequence_parallel=True)
        randomise_(layer, parallel)
        x = whole.chunk(2, dim=1)[rank].clone().requires_grad_(True)
        (y, _), saved = _with_saved_activations(layer, x)
        assert [t.untyped_storage().data_ptr() for t in saved] == [x.untyped_storage().data_ptr()]
        y.backward(upstream[rank])
        new = [y, x.grad, *(p.grad for p in layer.parameters())]

        x_old = x.detach().clone().requires_grad_(True)
        layer.zero_grad()
        gathered = gather_from_sequence_parallel_region(x_old, parallel.tp_group)
        y_old = torch.nn.functional.linear(gathered, layer.weight, layer.bias)
        y_old.backward(upstream[rank])
        for a, b in zip(new, [y_old, x_old.grad, *(p.grad for p in layer.parameters())]):
            assert torch.equal(a, b)

        weights = [_rank_weight(layer.weight.shape, r) for r in range(2)]  # as randomise_ draws them
        b = layer.bias.detach() if bias else None
        rtol = dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y, torch.nn.functional.linear(whole, weights[rank], b), **rtol)
        dx = sum(upstream[r] @ weights[r] for r in range(2))
        torch.testing.assert_close(x.grad, dx.chunk(2, dim=1)[rank], **rtol)
        dw = upstream[rank].flatten(0, 1).t() @ whole.flatten(0, 1)
        torch.testing.assert_close(new[2], dw, **rtol)
        if bias:
            torch.testing.assert_close(new[3], upstream[rank].sum((0, 1)), **rtol)

    # The output layer (tied logits) goes through the same function: s/2 positions kept, the same logits.
    def logits(hidden):
        return parallel_lm_logits(
            hidden, layer.weight, parallel, parallel_output=True, sequence_parallel=True
        )

    logits_out, saved = _with_saved_activations(layer, x, logits)
    assert [t.untyped_storage().data_ptr() for t in saved] == [x.untyped_storage().data_ptr()]
    assert torch.equal(logits_out, layer(x)[0])


def _with_saved_activations(module: torch.nn.Module, x: torch.Tensor, forward=None) -> tuple:
    """(forward(x) (default module(x)), the tensors autograd saved for backward that are not module's
    parameters)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    forward = module if forward is None else forward
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in params:
            saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return forward(x), saved


def _rank_weight(shape, tp_rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(b"weight") + 1000 * tp_rank)
    return 0.05 * torch.randn(shape, generator=generator)


def _check_mappings(rank: int, world_size: int, group) -> None:
    whole = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(11))  # the same on every rank
    mine = whole.chunk(world_size, dim=1)[rank]
    upstream = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(20 + rank))  # differs per rank

    x = whole.clone().requires_grad_(True)
    y = scatter_to_sequence_parallel_region(x, group)
    assert torch.equal(y, mine)
    y.backward(upstream.chunk(world_size, dim=1)[rank])
    expected = torch.cat([torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(20 + r)).chunk(world_size, dim=1)[r] for r in range(world_size)], dim=1)  # fmt: skip
    assert torch.equal(x.grad, expected)

    total = sum(
        torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(20 + r)) for r in range(world_size)
    )
    for grad_is_partial, want in ((True, total.chunk(world_size, dim=1)[rank]), (False, upstream.chunk(world_size, dim=1)[rank])):  # fmt: skip
        x = mine.clone().requires_grad_(True)
        y = gather_from_sequence_parallel_region(x, group, grad_is_partial=grad_is_partial)
        assert torch.equal(y, whole)
        y.backward(upstream)
        torch.testing.assert_close(x.grad, want, rtol=1e-6, atol=1e-6)

    x = upstream.clone().requires_grad_(True)
    y = reduce_scatter_to_sequence_parallel_region(x, group)
    torch.testing.assert_close(y, total.chunk(world_size, dim=1)[rank], rtol=1e-6, atol=1e-6)
    y.backward(whole.chunk(world_size, dim=1)[rank])
    assert torch.equal(x.grad, whole)


# --- arguments -----------------------------------------------------------------------------------------


def test_sequence_length_not_divisible_by_tp_is_refused(capsys):
    argv = [*TINY, *TP2, *SP, "--train-iters", "4", "--seq-length", "31"]
    with pytest.raises(SystemExit) as exit_info:
        parse_args([str(a) for a in argv], world_size=2)
    assert exit_info.value.code != 0
    assert "--seq-length 31 is not divisible by --tensor-model-parallel-size 2" in capsys.readouterr().err


def test_sequence_parallel_with_tp1_is_ignored_with_a_note(capsys):
    args = parse_args([*TINY, *SP, "--train-iters", "4"], world_size=1)
    assert args.sequence_parallel is False
    assert "--sequence-parallel ignored" in capsys.readouterr().out


@pytest.mark.slow
def test_llama_tp2_dp2_with_both_features_matches_plain(tmp_path):
    """The Llama family (RMSNorm, SwiGLU, RoPE, grouped-query attention, untied output layer, no biases)
    with sequence parallelism + the distributed optimizer at TP 2 x DP 2 equals neither, fp32."""
    llama = (
        "--position-embedding-type rope --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --ffn-hidden-size 64 "
        "--group-query-attention --num-query-groups 2 --untie-embeddings-and-output-weights --disable-bias-linear"
    ).split()
    base = [*TINY, *NO_DROPOUT, *ADAM_EPS, *TP2, *llama, "--train-iters", 4, "--global-batch-size", 8]
    variants = {"plain": [], "both": [*SP, "--use-distributed-optimizer"]}
    results = run_distributed(_variants, 4, args=(str(tmp_path), base, variants))
    _compare(str(tmp_path), results, {"both": "plain"}, tp=2, rtol=1e-5, param_rtol=1e-5)
