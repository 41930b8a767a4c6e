"""Training throughput of our GPT (the real train_step: DDP buffers, mixed-precision optimizer) beside
Hugging Face transformers' GPT2LMHeadModel with torch AdamW, on the same shape, in one run.

    python benchmarks/train_throughput.py                      # CPU: fp32 and bf16 vs HF fp32
    python benchmarks/train_throughput.py --preset gpt2-345m --device cuda --no-hf   # GPU: MFU at bf16
    python benchmarks/train_throughput.py --arch llama --repeats 5   # Llama shape vs LlamaForCausalLM (benchmarks/llama_throughput.py)

Prints tokens/s and model TFLOP/s (Megatron's 72 B s L h^2 (1 + s/6h + V/12Lh) count) per configuration,
and, with --peak-tflops (or on a known GPU), the model FLOP utilisation (MFU).
"""

from __future__ import annotations

import argparse
import itertools
import time
from functools import partial

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
# Dense bf16 peak of known accelerators, TFLOP/s.
GPU_PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _loss(loss_mask, output):
    loss = (output.float() * loss_mask).sum() / loss_mask.sum()
    return loss, {"lm loss": loss.detach()}


def _forward_step(data_iterator, model, args, parallel):
    tokens, labels, position_ids, loss_mask = next(data_iterator)
    return model(tokens, position_ids, None, labels=labels), partial(_loss, loss_mask)


def bench_ours(shape: dict, vocab: int, dtype: torch.dtype, device: str, iters: int, warmup: int) -> float:
    """Seconds per iteration of our train_step."""
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
        model, OptimizerConfig(lr=1e-4, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16), parallel
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
    return _time(
        lambda: train_step(_forward_step, it, model, optimizer, 1, args, parallel), iters, warmup, device
    )


def bench_hf(shape: dict, vocab: int, device: str, iters: int, warmup: int) -> float:
    """Seconds per iteration of GPT2LMHeadModel forward/backward + torch AdamW, fp32."""
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
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    b, s = shape["micro_batch_size"], shape["seq_length"]
    tokens = torch.randint(0, vocab, (b, s), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    return _time(step, iters, warmup, device)


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
    parser.add_argument("--repeats", type=int, default=5, help="--arch llama: interleaved timing rounds.")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS) + sorted(LLAMA_PRESETS), default=None,
        help="default cpu-small (--arch gpt) or llama-cpu-small (--arch llama)",
    )  # fmt: skip
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU).")
    parser.add_argument("--no-hf", action="store_true", help="Skip the Hugging Face baseline.")
    parser.add_argument("--no-fp32", action="store_true", help="Skip our fp32 run.")
    parser.add_argument("--peak-tflops", type=float, default=None, help="Device bf16 peak, for MFU.")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.arch == "llama":
        args.preset = args.preset or "llama-cpu-small"
        if args.preset not in LLAMA_PRESETS:
            parser.error(f"--arch llama takes a --preset of {sorted(LLAMA_PRESETS)}, got {args.preset}")
        return llama_main(args)
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
    results = {}
    runs = []
    if not args.no_hf:
        runs.append(
            (
                "HF GPT2LMHeadModel fp32",
                lambda: bench_hf(shape, args.vocab_size, args.device, args.iters, args.warmup),
            )
        )
    if not args.no_fp32:
        runs.append(
            (
                "ours fp32",
                lambda: bench_ours(
                    shape, args.vocab_size, torch.float32, args.device, args.iters, args.warmup
                ),
            )
        )
    runs.append(
        (
            "ours --bf16",
            lambda: bench_ours(shape, args.vocab_size, torch.bfloat16, args.device, args.iters, args.warmup),
        )
    )
    for name, run in runs:
        seconds = run()
        results[name] = seconds
        line = f"{name:26s} {seconds * 1000:9.1f} ms/iter {b * s / seconds:10.0f} tokens/s {flops / seconds / 1e12:8.3f} TFLOP/s"
        if peak:
            line += f"  MFU {flops / seconds / 1e12 / peak:6.1%} of {peak:.0f} TFLOP/s"
        print(line, flush=True)
    base = results.get("HF GPT2LMHeadModel fp32")
    if base:
        for name, seconds in results.items():
            if name != "HF GPT2LMHeadModel fp32":
                print(f"speedup of {name} over HF fp32: {base / seconds:.2f}x")


if __name__ == "__main__":
    main()
