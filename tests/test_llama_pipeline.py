"""The Llama-shaped GPT (RoPE, RMSNorm, SwiGLU, grouped-query attention with 2 groups of 4 heads, untied
output layer, no biases) trained through pretrain_gpt under pipeline parallelism equals the single process:
PP 2, TP 2 x PP 2 with sequence parallelism, PP 2 x DP 2 with the distributed optimizer. Loss curves,
logged norms and every final parameter (1e-5; dropout off, every parameter randomised; the harness is
tests/test_pipeline_training.py's, which splits SwiGLU's [gate; up] per TP rank as Megatron does)."""

from __future__ import annotations

import pytest
import torch

from megatron.model import GPTModel
from megatron.parallel.pipeline_layout import global_key, stage_layouts
from megatron.parallel.random import model_parallel_seed
from megatron.parallel.state import single_process_state
from tests.test_llama_parallel import LLAMA as LLAMA_CONFIG
from tests.test_llama_parallel import llama_model
from tests.test_model_common import tiny_config
from tests.test_pipeline_training import ADAM, _compare_with_single_process
from tests.test_pipeline_training import wikitext as wikitext  # the module-scoped real-data fixture

# 4 heads of dimension 4 in 2 query groups; ffn 24 is split [gate; up] into 12 + 12 on each TP rank.
LLAMA = (
    "--num-attention-heads", "4", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
    "--norm-epsilon", "1e-6", "--swiglu", "--ffn-hidden-size", "24", "--group-query-attention",
    "--num-query-groups", "2", "--untie-embeddings-and-output-weights", "--disable-bias-linear",
)  # fmt: skip


def test_llama_stages_hold_the_whole_models_initial_weights():
    """Each of 2 stages (and of 2 stages x 2 virtual chunks) of the untied Llama holds exactly its part of
    the whole model, drawn as the whole model draws it: the embedding on the first chunk, the final norm
    and the output layer on the last, no copy of a tied embedding anywhere."""
    parallel = single_process_state()
    whole = dict(llama_model(parallel, num_layers=4).named_parameters())
    for vp in (1, 2):
        held = {}
        for chunks in stage_layouts(4, 2, vp):
            for layout in chunks:
                model_parallel_seed(1234, parallel)
                stage = GPTModel(
                    tiny_config("gpt", **{**LLAMA_CONFIG, "num_layers": 4}), parallel, stage=layout
                )
                for name, param in stage.named_parameters():
                    assert name != "word_embeddings_for_head.weight"
                    assert global_key(name, layout) not in held, name
                    held[global_key(name, layout)] = param
        assert held.keys() == whole.keys()
        for name, param in whole.items():
            assert torch.equal(held[name], param), (vp, name)


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
