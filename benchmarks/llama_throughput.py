"""Training throughput of our Llama-shaped GPT (the real train_step: DDP buffers, fused AdamW, clipping)
against Hugging Face transformers' LlamaForCausalLM of the same shape (SDPA attention, torch's fused AdamW,
clip_grad_norm_ 1.0), fp32. Called by `python benchmarks/train_throughput.py --arch llama`.

Both models are built once; then `--repeats` rounds each time `--iters` steps of one and then of the other
(alternating which goes first), so slow drifts of the machine hit both alike. Printed: the median tokens/s of
each over the rounds, every round's numbers, the ratio of the medians, and the median and range of the
per-round ratios (the steadier number on a machine whose load changes). With `--cpu-time` every step of both
is timed by the process's CPU time (time.process_time) instead of the wall clock: tokens per CPU second, which
time spent waiting for cores taken by other jobs does not inflate.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from functools import partial
from typing import Callable

import torch

from megatron.distributed import DistributedDataParallel
from megatron.model import GPTModel, TransformerConfig
from megatron.model.utils import model_flops
from megatron.optimizer import OptimizerConfig, build_optimizer
from megatron.parallel.random import model_parallel_seed
from megatron.parallel.state import single_process_state
from megatron.training import train_step

LLAMA_PRESETS = {
    "llama-cpu-small": dict(num_layers=4, hidden_size=256, num_attention_heads=8, num_query_groups=2,
                            ffn_hidden_size=640, seq_length=256, micro_batch_size=8),
    "llama-1b": dict(num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
                     ffn_hidden_size=8192, seq_length=2048, micro_batch_size=4),
}  # fmt: skip


def _loss(loss_mask, output):
    loss = (output.float() * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach()}


def _forward_step(data_iterator, model, args, parallel):
    tokens, labels, position_ids, loss_mask = next(data_iterator)
    return model(tokens, position_ids, None, labels=labels), partial(_loss, loss_mask)


def ours_step(shape: dict, vocab: int, device: str) -> tuple[torch.nn.Module, Callable[[], None]]:
    """(model, one training step) of our Llama-shaped GPTModel (RoPE, RMSNorm, SwiGLU, GQA, untied, no biases)."""
    parallel = single_process_state()
    model_parallel_seed(1234, parallel)
    config = TransformerConfig(
        num_layers=shape["num_layers"], hidden_size=shape["hidden_size"],
        num_attention_heads=shape["num_attention_heads"], num_query_groups=shape["num_query_groups"],
        ffn_hidden_size=shape["ffn_hidden_size"], padded_vocab_size=vocab,
        max_position_embeddings=shape["seq_length"], hidden_dropout=0.0, attention_dropout=0.0,
        position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False,
        untie_embeddings_and_output_weights=True, layernorm_epsilon=1e-5,
    )  # fmt: skip
    gpt = GPTModel(config, parallel).to(device)
    model = DistributedDataParallel(gpt, parallel)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-4, weight_decay=0.1, clip_grad=1.0), parallel)
    b, s = shape["micro_batch_size"], shape["seq_length"]
    data = torch.randint(0, vocab, (b, s + 1), device=device)
    batch = (
        data[:, :-1],
        data[:, 1:],
        torch.arange(s, device=device).expand(b, s),
        torch.ones(b, s, device=device),
    )
    it = itertools.repeat(batch)
    return gpt, lambda: train_step(_forward_step, it, model, optimizer, 1, argparse.Namespace(), parallel)


def hf_step(shape: dict, vocab: int, device: str) -> tuple[torch.nn.Module, Callable[[], None]]:
    """(model, one training step) of transformers' LlamaForCausalLM (SDPA) with fused AdamW and clipping at 1.0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=shape["hidden_size"], intermediate_size=shape["ffn_hidden_size"],
        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_attention_heads"],
        num_key_value_heads=shape["num_query_groups"], max_position_embeddings=shape["seq_length"],
        rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(device).train()
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-4,
        fused=True,
    )
    b, s = shape["micro_batch_size"], shape["seq_length"]
    tokens = torch.randint(0, vocab, (b, s), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return model, step


def _seconds_per_step(
    step: Callable[[], None], iters: int, device: str, clock: Callable[[], float] = time.perf_counter
) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = clock()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return (clock() - start) / iters


def run(
    preset: str,
    vocab: int,
    device: str,
    iters: int,
    warmup: int,
    repeats: int,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """tokens/s of each implementation in every round (interleaved, alternating order), by `clock`
    (time.process_time: tokens per CPU second of this process, for both alike)."""
    shape = LLAMA_PRESETS[preset]
    steps = {
        "ours": ours_step(shape, vocab, device)[1],
        "HF LlamaForCausalLM": hf_step(shape, vocab, device)[1],
    }
    tokens = shape["micro_batch_size"] * shape["seq_length"]
    for step in steps.values():
        for _ in range(warmup):
            step()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(repeats):
        order = list(steps) if round_index % 2 == 0 else list(reversed(steps))
        for name in order:
            rates[name].append(tokens / _seconds_per_step(steps[name], iters, device, clock))
    return rates


def main(args: argparse.Namespace) -> None:
    preset = args.preset
    shape = LLAMA_PRESETS[preset]
    flops = model_flops(
        shape["micro_batch_size"], shape["seq_length"], shape["num_layers"], shape["hidden_size"], args.vocab_size,
        ffn_hidden_size=shape["ffn_hidden_size"], num_attention_heads=shape["num_attention_heads"],
        num_query_groups=shape["num_query_groups"], swiglu=True,
    )  # fmt: skip
    clock, unit = (time.process_time, "CPU s") if args.cpu_time else (time.perf_counter, "s")
    print(f"llama shape {preset}: {shape}, vocab {args.vocab_size}; device {args.device}, threads "
          f"{torch.get_num_threads()}; fp32; {args.repeats} interleaved rounds of {args.iters} steps; "
          f"timed by {clock.__name__}")  # fmt: skip
    rates = run(preset, args.vocab_size, args.device, args.iters, args.warmup, args.repeats, clock)
    tokens = shape["micro_batch_size"] * shape["seq_length"]
    for name, values in rates.items():
        median = statistics.median(values)
        rounds = " ".join(f"{v:.0f}" for v in values)
        print(
            f"{name:22s} median {median:9.0f} tokens/{unit} {flops * median / tokens / 1e12:7.3f} TFLOP/{unit}"
            f"  (rounds: {rounds})"
        )
    ratio = statistics.median(rates["ours"]) / statistics.median(rates["HF LlamaForCausalLM"])
    print(f"ours / HF LlamaForCausalLM (median tokens/{unit}): {ratio:.2f}x")
    # Each round times both back to back, so its ratio cancels slow drifts of a shared machine's load.
    paired = sorted(o / h for o, h in zip(rates["ours"], rates["HF LlamaForCausalLM"]))
    print(
        f"ours / HF per round: median {statistics.median(paired):.2f}x, range {paired[0]:.2f}-{paired[-1]:.2f}x"
    )
