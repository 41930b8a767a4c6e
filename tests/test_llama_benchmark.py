"""benchmarks/llama_throughput.py compares like with like: our model and transformers' LlamaForCausalLM of a
preset have the same parameters (names aside), and both training steps run (timings are never asserted)."""

from __future__ import annotations

import time

from benchmarks import llama_throughput

TINY = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
            seq_length=16, micro_batch_size=2)  # fmt: skip


def test_benchmark_models_have_the_same_shape_and_step(monkeypatch):
    ours, _ = llama_throughput.ours_step(TINY, 256, "cpu")
    hf, _ = llama_throughput.hf_step(TINY, 256, "cpu")
    shapes = sorted(tuple(p.shape) for p in ours.parameters())
    hf_shapes = [tuple(p.shape) for p in hf.parameters()]
    # Our fused QKV [(4 + 2 + 2) d, h] and [gate; up] [2 f, h] are HF's q/k/v and gate/up stacked.
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters())
    assert len(shapes) == len(hf_shapes) - 2 * 2 - 1 * 2  # per layer: q,k,v -> 1 and gate,up -> 1
    monkeypatch.setitem(llama_throughput.LLAMA_PRESETS, "tiny", TINY)
    rates = llama_throughput.run("tiny", 256, "cpu", iters=1, warmup=1, repeats=2)
    assert set(rates) == {"ours", "HF LlamaForCausalLM"} and all(len(v) == 2 for v in rates.values())
    # --cpu-time: the same rounds timed by the process's CPU time, for both sides.
    rates = llama_throughput.run("tiny", 256, "cpu", iters=1, warmup=0, repeats=1, clock=time.process_time)
    assert all(len(v) == 1 and v[0] > 0 for v in rates.values())
