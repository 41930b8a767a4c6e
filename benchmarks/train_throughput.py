"""Training throughput of our GPT (the real train_step: DDP buffers, mixed-precision optimizer) beside
Hugging Face transformers' GPT2LMHeadModel, on the same shape, in one run.

    python benchmarks/train_throughput.py                      # CPU: fp32 and bf16 vs HF fp32
    python benchmarks/train_throughput.py --preset gpt2-345m --device cuda --no-hf   # GPU: MFU at bf16
    python benchmarks/train_throughput.py --arch llama --repeats 5   # Llama shape vs LlamaForCausalLM (benchmarks/llama_throughput.py)

Fair comparison: both use the same torch AdamW implementation (fused where torch has fused kernels for
the device, as our optimizer does, else foreach), lr 1e-4, weight decay 0.01, gradient clipping at 1.0,
no dropout difference (both at their defaults of 0.1), the same threads. All models are built first,
warmed up, then timed in --repeats interleaved rounds of --iters steps each (HF, ours, ours bf16, HF, ...),
so that a change in machine load hits every configuration alike. Prints the median ms/iteration with the
spread over the rounds, tokens/s and model TFLOP/s (Megatron's 72 B s L h^2 (1 + s/6h + V/12Lh) count),
the ratio to HF (median of the per-round ratios, and its range), and with --peak-tflops (or on a known GPU)
the model FLOP utilisation (MFU).
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

if __package__ in (None, ""):  # run as a script: benchmarks/ is on sys.path
    from llama_throughput import LLAMA_PRESETS
    from llama_throughput import main as llama_main
else:
    from benchmarks.llama_throughput import LLAMA_PRESETS
    from benchmarks.llama_throughput import main as llama_main

PRESETS = {
    "cpu-small": dict(
        num_layers=4, hidden_size=256, num_attention_heads=4, seq_length=256, micro_batch_size=8
    ),
    "gpt2-345m": dict(
        num_layers=24, hidden_size=1024, num_attention_heads=16, seq_length=1024, micro_batch_size=8
    ),
    "gpt2-1.3b": dict(
        num_layers=24, hidden_size=2048, num_attention_heads=16, seq_length=1024, micro_batch_size=8
    ),
}
HF = "HF GPT2LMHeadModel fp32"
# Dense bf16 peak of known accelerators, TFLOP/s.
GPU_PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _loss(loss_mask, output):
    loss = (output.float() * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach()}


def _forward_step(data_iterator, model, args, parallel):
    tokens, labels, position_ids, loss_mask = next(data_iterator)
    return model(tokens, position_ids, None, labels=labels), partial(_loss, loss_mask)


def adamw_kernel(device: str) -> dict:
    """The AdamW implementation our optimizer picks (megatron/optimizer/optimizer.py), used for HF too."""
    return {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {"foreach": True}


def build_ours(shape: dict, vocab: int, dtype: torch.dtype, device: str) -> Callable[[], None]:
    """One iteration of our train_step (forward, backward, clip 1.0, AdamW) as a closure."""
    parallel = single_process_state()
    model_parallel_seed(1234, parallel)
    config = TransformerConfig(
        num_layers=shape["num_layers"],
        hidden_size=shape["hidden_size"],
        num_attention_heads=shape["num_attention_heads"],
        padded_vocab_size=vocab,
        max_position_embeddings=shape["seq_length"],
        bias_gelu_fusion=True,
    )
    model = GPTModel(config, parallel).to(device=device, dtype=dtype)
    model = DistributedDataParallel(model, parallel)
    optimizer = build_optimizer(
        model,
        OptimizerConfig(
            lr=1e-4,
            weight_decay=0.01,
            clip_grad=1.0,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
        ),
        parallel,
    )
    b, s = shape["micro_batch_size"], shape["seq_length"]
    data = torch.randint(0, vocab, (b, s + 1), device=device)
    batch = (
        data[:, :-1],
        data[:, 1:],
        torch.arange(s, device=device).expand(b, s),
        torch.ones(b, s, device=device),
    )
    it = itertools.repeat(batch)
    args = argparse.Namespace()
    return lambda: train_step(_forward_step, it, model, optimizer, 1, args, parallel)


def build_hf(shape: dict, vocab: int, device: str) -> Callable[[], None]:
    """One iteration of GPT2LMHeadModel forward/backward, clip 1.0 and the same torch AdamW, fp32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1234)
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=shape["seq_length"],
        n_embd=shape["hidden_size"],
        n_layer=shape["num_layers"],
        n_head=shape["num_attention_heads"],
    )
    model = GPT2LMHeadModel(config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **adamw_kernel(device))
    b, s = shape["micro_batch_size"], shape["seq_length"]
    tokens = torch.randint(0, vocab, (b, s), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return step


def _time(fn, iters: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def interleaved(
    steps: dict[str, Callable[[], None]], repeats: int, iters: int, warmup: int, device: str
) -> dict:
    """{name: [seconds per iteration in each round]}: every step function warmed up, then timed in turn,
    round after round."""
    for fn in steps.values():
        _time(fn, 1, warmup, device)
    rounds: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            rounds[name].append(_time(fn, iters, 0, device))
    return rounds


def gemm_tflops(dtype: torch.dtype, device: str, n: int = 2048, reps: int = 5) -> float:
    """Achieved TFLOP/s of one n x n x n matrix product: the ceiling the training step can approach."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = _time(lambda: a @ b, reps, 2, device)
    return 2 * n**3 / seconds / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--arch", choices=("gpt", "llama"), default="gpt", help="llama: benchmarks/llama_throughput.py"
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS) + sorted(LLAMA_PRESETS), default=None,
        help="default cpu-small (--arch gpt) or llama-cpu-small (--arch llama)",
    )  # fmt: skip
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=5, help="Iterations per timed round.")
    parser.add_argument("--repeats", type=int, default=7, help="Interleaved rounds; the median is reported.")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU).")
    parser.add_argument("--no-hf", action="store_true", help="Skip the Hugging Face baseline.")
    parser.add_argument("--no-fp32", action="store_true", help="Skip our fp32 run.")
    parser.add_argument("--peak-tflops", type=float, default=None, help="Device bf16 peak, for MFU.")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="--arch llama on CPU: time both sides by the process's CPU time instead of the wall clock "
        "(tokens per CPU second; steadier on a machine shared with other jobs).",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.arch == "llama":
        args.preset = args.preset or "llama-cpu-small"
        if args.preset not in LLAMA_PRESETS:
            parser.error(f"--arch llama takes a --preset of {sorted(LLAMA_PRESETS)}, got {args.preset}")
        if args.cpu_time and args.device != "cpu":
            parser.error("--cpu-time measures CPU runs only (--device cpu)")
        return llama_main(args)
    if args.cpu_time:
        parser.error("--cpu-time is implemented for --arch llama only")
    args.preset = args.preset or "cpu-small"
    if args.preset not in PRESETS:
        parser.error(f"--arch gpt takes a --preset of {sorted(PRESETS)}, got {args.preset}")
    shape = PRESETS[args.preset]
    b, s = shape["micro_batch_size"], shape["seq_length"]
    flops = model_flops(b, s, shape["num_layers"], shape["hidden_size"], args.vocab_size)
    peak = args.peak_tflops
    if peak is None and args.device == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
    print(
        f"shape {args.preset}: layers {shape['num_layers']}, hidden {shape['hidden_size']}, heads "
        f"{shape['num_attention_heads']}, seq {s}, micro batch {b}, vocab {args.vocab_size}; device {args.device}, "
        f"threads {torch.get_num_threads()}; model FLOPs/iteration {flops:.3e}"
    )
    fp32_gemm, bf16_gemm = gemm_tflops(torch.float32, args.device), gemm_tflops(torch.bfloat16, args.device)
    print(
        f"GEMM 2048^3: fp32 {fp32_gemm:.3f} TFLOP/s, bf16 {bf16_gemm:.3f} TFLOP/s "
        f"(bf16/fp32 = {bf16_gemm / fp32_gemm:.2f}x on this device)"
    )
    steps = {}
    if not args.no_hf:
        steps[HF] = build_hf(shape, args.vocab_size, args.device)
    if not args.no_fp32:
        steps["ours fp32"] = build_ours(shape, args.vocab_size, torch.float32, args.device)
    steps["ours --bf16"] = build_ours(shape, args.vocab_size, torch.bfloat16, args.device)
    rounds = interleaved(steps, args.repeats, args.iters, args.warmup, args.device)
    print(
        f"{args.repeats} interleaved rounds of {args.iters} iterations after {args.warmup} warm-up iterations:"
    )
    for name, times in rounds.items():
        seconds = statistics.median(times)
        line = (
            f"{name:26s} {seconds * 1000:9.1f} ms/iter (rounds {min(times) * 1000:.1f}-{max(times) * 1000:.1f}) "
            f"{b * s / seconds:10.0f} tokens/s {flops / seconds / 1e12:8.3f} TFLOP/s"
        )
        if peak:
            line += f"  MFU {flops / seconds / 1e12 / peak:6.1%} of {peak:.0f} TFLOP/s"
        print(line, flush=True)
    if HF in rounds:
        for name, times in rounds.items():
            if name != HF:
                ratios = [hf / t for hf, t in zip(rounds[HF], times)]
                print(
                    f"speed of {name} / HF fp32: {statistics.median(ratios):.2f}x "
                    f"(rounds {min(ratios):.2f}-{max(ratios):.2f}x)"
                )


if __name__ == "__main__":
    main()
