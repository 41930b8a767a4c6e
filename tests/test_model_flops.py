"""FLOP formulas against an explicit count, and the benchmark's parameter count against the closed form."""

from __future__ import annotations

import pytest

from benchmarks.model_flops import main
from megatron.model.utils import hardware_flops, model_flops


def _forward_matmul_flops(b: int, s: int, layers: int, h: int, v: int) -> tuple[float, float]:
    """(transformer layers, logit layer) forward FLOPs, counting 2 per multiply-add."""
    per_layer = 2 * b * s * h * 3 * h + 2 * b * s * s * h * 2 + 2 * b * s * h * h + 2 * 2 * b * s * h * 4 * h
    return layers * per_layer, 2 * b * s * h * v


@pytest.mark.parametrize(
    "b, s, layers, h, v", [(1, 1024, 24, 1024, 50304), (1536, 2048, 96, 12288, 50304), (3, 8, 2, 32, 64)]
)
def test_flop_formulas_match_explicit_counts(b: int, s: int, layers: int, h: int, v: int) -> None:
    transformer, logits = _forward_matmul_flops(b, s, layers, h, v)
    assert model_flops(b, s, layers, h, v) == pytest.approx(3 * (transformer + logits), rel=1e-12)
    full = hardware_flops(b, s, layers, h, v, "full")
    assert full == pytest.approx(4 * transformer + 3 * logits, rel=1e-12)
    assert full == pytest.approx(
        96 * b * s * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h)), rel=1e-12
    )
    attention_core = layers * 2 * b * s * s * h * 2
    assert hardware_flops(b, s, layers, h, v, "selective") == pytest.approx(
        3 * (transformer + logits) + attention_core
    )
    assert hardware_flops(b, s, layers, h, v, None) == model_flops(b, s, layers, h, v)


def test_hardware_flops_rejects_unknown_granularity() -> None:
    with pytest.raises(ValueError, match="recompute_granularity"):
        hardware_flops(1, 8, 2, 32, 64, "everything")


def test_benchmark_prints_parameter_count_and_flops(capsys: pytest.CaptureFixture) -> None:
    layers, h, s, positions = 24, 1024, 1024, 1024
    main(["--num-layers", "24", "--hidden-size", "1024", "--num-attention-heads", "16", "--seq-length", "1024",
          "--vocab-size", "50257", "--micro-batch-size", "8"])  # fmt: skip
    out = capsys.readouterr().out
    v = 50304  # 50257 padded to a multiple of 128
    expected_params = 12 * layers * h * h + 13 * layers * h + (v + positions) * h + 2 * h
    assert f"parameters:                              {expected_params:,} " in out
    assert f"{model_flops(8, s, layers, h, v):.4e}" in out
    assert f"{hardware_flops(8, s, layers, h, v, 'full'):.4e}" in out


def test_benchmark_rejects_bad_shapes(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--num-layers", "2", "--hidden-size", "30", "--num-attention-heads", "4", "--seq-length", "8",
              "--padded-vocab-size", "64"])  # fmt: skip
    assert exit_info.value.code != 0
    assert "--hidden-size (30) must be divisible by --num-attention-heads (4)" in capsys.readouterr().err
