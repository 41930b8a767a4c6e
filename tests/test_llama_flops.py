"""Model FLOPs of Llama-shaped models (SwiGLU's three matrices, grouped-query attention's smaller K/V, untied
output layer) against a matmul-by-matmul hand count, and benchmarks/model_flops.py's parameter count
against Llama-3-8B's published size."""

from __future__ import annotations

import pytest

from benchmarks.model_flops import main
from megatron.arguments import parse_args
from megatron.arguments.llama import flops_shape
from megatron.model.utils import hardware_flops, model_flops


def _hand_count(b, s, layers, h, v, heads, d, groups, ffn, swiglu) -> tuple[float, float, float]:
    """(dense per layer, attention core per layer, logits) forward FLOPs, 2 per multiply-add."""
    q, k, vv = 2 * b * s * h * heads * d, 2 * b * s * h * groups * d, 2 * b * s * h * groups * d
    out = 2 * b * s * heads * d * h
    mlp = (3 if swiglu else 2) * 2 * b * s * h * ffn  # gate, up, down (SwiGLU) or h->f, f->h
    core = 2 * b * s * s * heads * d * 2  # QK^T and probabilities x V
    return q + k + vv + out + mlp, core, 2 * b * s * h * v


@pytest.mark.parametrize(
    "b, s, layers, h, v, heads, d, groups, ffn, swiglu",
    [
        (1, 8192, 32, 4096, 128256, 32, 128, 8, 14336, True),  # Llama-3-8B
        (3, 32, 2, 32, 256, 4, 8, 2, 64, True),  # the tests' tiny Llama
        (2, 16, 2, 48, 128, 6, 10, 3, 100, False),  # GQA with GeLU and n d != h
    ],
)
def test_llama_flops_match_hand_count(b, s, layers, h, v, heads, d, groups, ffn, swiglu):
    dense, core, logits = _hand_count(b, s, layers, h, v, heads, d, groups, ffn, swiglu)
    shape = dict(
        ffn_hidden_size=ffn, num_attention_heads=heads, kv_channels=d, num_query_groups=groups, swiglu=swiglu
    )
    assert model_flops(b, s, layers, h, v, **shape) == pytest.approx(
        3 * (layers * (dense + core) + logits), rel=1e-12
    )
    assert hardware_flops(b, s, layers, h, v, "full", **shape) == pytest.approx(
        4 * layers * (dense + core) + 3 * logits, rel=1e-12
    )
    assert hardware_flops(b, s, layers, h, v, "selective", **shape) == pytest.approx(
        3 * (layers * (dense + core) + logits) + layers * core, rel=1e-12
    )


def test_training_log_uses_the_llama_shape():
    args = parse_args(
        "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 "
        "--train-iters 10 --lr 1e-3 --mock-data --vocab-size 100 --swiglu --ffn-hidden-size 96 "
        "--group-query-attention --num-query-groups 2".split(),
        world_size=1,
    )
    dense, core, logits = _hand_count(2, 32, 2, 64, 128, 4, 16, 2, 96, True)
    flops = hardware_flops(2, 32, 2, 64, 128, None, **flops_shape(args))
    assert flops == pytest.approx(3 * (2 * (dense + core) + logits), rel=1e-12)


def test_benchmark_counts_llama3_8b_parameters(capsys):
    main("--num-layers 32 --hidden-size 4096 --num-attention-heads 32 --group-query-attention --num-query-groups 8 "
         "--swiglu --ffn-hidden-size 14336 --untie-embeddings-and-output-weights --position-embedding-type rope "
         "--normalization RMSNorm --disable-bias-linear --seq-length 8192 --padded-vocab-size 128256".split())  # fmt: skip
    out = capsys.readouterr().out
    assert "parameters:                              8,030,261,248 " in out  # Meta's Llama-3-8B
    dense, core, logits = _hand_count(1, 8192, 32, 4096, 128256, 32, 128, 8, 14336, True)
    assert f"{3 * (32 * (dense + core) + logits):.4e}" in out
