"""The Llama-shaped GPT (RoPE, RMSNorm, SwiGLU, grouped-query attention with 2 groups of 4 heads, untied
output layer, no biases) trained through pretrain_gpt under pipeline parallelism equals the single process:
PP 2, TP 2 x PP 2 with sequence parallelism, PP 2 x DP 2 with the distributed optimizer. Loss curves,
logged norms and every final parameter (1e-5; dropout off, every parameter randomised; the harness is
tests/test_pipeline_training.py's, which splits SwiGLU's [gate; up] per TP rank as Megatron does)."""

from __future__ import annotations

import pytest

from tests.test_pipeline_training import ADAM, _compare_with_single_process
from tests.test_pipeline_training import wikitext as wikitext  # the module-scoped real-data fixture

# 4 heads of dimension 4 in 2 query groups; ffn 24 is split [gate; up] into 12 + 12 on each TP rank.
LLAMA = (
    "--num-attention-heads", "4", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
    "--norm-epsilon", "1e-6", "--swiglu", "--ffn-hidden-size", "24", "--group-query-attention",
    "--num-query-groups", "2", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
)  # fmt: skip


def test_llama_pp2_equals_single_process(wikitext, tmp_path):
    """RoPE positions on every stage, the untied output layer on the last stage only."""
    _compare_with_single_process("gpt", wikitext, [{"pp": 2}], tmp_path, LLAMA)


@pytest.mark.slow
def test_llama_tp2_pp2_sequence_parallel_equals_single_process(wikitext, tmp_path):
    """Grouped-query attention split over TP with the sequence split over TP between stages."""
    _compare_with_single_process("gpt", wikitext, [{"tp": 2, "pp": 2, "sp": True}], tmp_path, LLAMA)


@pytest.mark.slow
def test_llama_pp2_dp2_distributed_optimizer_equals_single_process(wikitext, tmp_path):
    _compare_with_single_process(
        "gpt", wikitext, [{"pp": 2, "dp": 2, "zero": True}], tmp_path, (*LLAMA, *ADAM)
    )
