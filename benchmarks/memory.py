"""Memory per rank, measured (live tensors) beside the formulas: weights, gradients, optimizer state, and
activations per transformer layer, for a fixed GPT at TP x DP in {1, 2, 4}, with and without the
distributed optimizer (ZeRO-1), sequence parallelism and each recompute granularity.

    python benchmarks/memory.py                 # CPU, gloo: spawns TP x DP processes per grid point
    python benchmarks/memory.py --dtype bf16

How it measures (on the rank with global rank 0 of each grid point; all ranks of a grid point agree up
to padding): weights = the bytes of the distinct storages of the model's parameters (with ZeRO the
parameter buffer, including its padding to a multiple of DP per bucket); gradients = the fp32 gradient
buffer; optimizer = after one step, the distinct storages of the torch optimizer's state (Adam moments,
step counters) and of the fp32 master weights that are not model parameters; activations = the distinct
storages saved for backward (torch.autograd.graph.saved_tensors_hooks) while the transformer layers run
their forward on one micro batch, parameters excluded, divided by the number of layers. CPU only (gloo):
the activation formula is this code's on CPU; on CUDA other SDPA kernels and 1-byte dropout masks change it.

The formulas (bytes per rank; P = parameters held by this rank, d = DP size, t = TP size):
    weights B P (B = 4 fp32, 2 bf16);  gradients 4 P;
    optimizer (8 + 4 [bf16: fp32 masters]) P, divided by d with ZeRO:  fp32 16 P -> 8 P + 8 P / d,
    bf16 18 P -> 6 P + 12 P / d  (Megatron's figure).
Activations per layer, with E = s b h, r = t with sequence parallelism and 1 without, derived from
the tensors this code saves (listed in `activation_bytes_per_layer`). Megatron's paper counts 2-byte
activations, 1-byte dropout masks and the a s^2 b attention scores: sbh (34 + 5 a s / h) without
parallelism. Here, on CPU, torch.nn.functional.dropout keeps its mask in the activation dtype (not 1
byte), the layernorms save their fp32 input, and scaled_dot_product_attention with dropout takes the
math path in fp32 (q, k, v copies and three a s^2 b tensors of 4 bytes: softmax, mask, dropped
probabilities). With sequence parallelism the two column-parallel GEMMs keep their all-gathered input
whole (B E each): backward then needs no second all-gather (2 all-gathers + 2 reduce-scatters each way).
"""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron.distributed import DistributedDataParallel
from megatron.model import GPTModel, TransformerConfig
from megatron.optimizer import OptimizerConfig, build_optimizer
from megatron.parallel.random import model_parallel_seed
from megatron.parallel.state import ParallelState, initialize_model_parallel

SHAPE = dict(
    num_layers=2, hidden_size=256, num_attention_heads=8, seq_length=256, micro_batch_size=2, vocab=1024
)
GRID = [(1, 1), (1, 2), (1, 4), (2, 1), (4, 1), (2, 2)]  # (TP, DP)
RECOMPUTE = (None, "selective", "full")


@dataclass
class Variant:
    zero: bool
    sequence_parallel: bool
    recompute: str | None


def activation_bytes_per_layer(t: int, sp: bool, recompute: str | None, dtype_bytes: int) -> int:
    """Bytes this code saves for backward per transformer layer on CPU with dropout on (module docstring)."""
    s, b, h, a = (
        SHAPE["seq_length"],
        SHAPE["micro_batch_size"],
        SHAPE["hidden_size"],
        SHAPE["num_attention_heads"],
    )
    E, B, F = s * b * h, dtype_bytes, 4
    r = t if sp else 1
    if recompute == "full":
        return B * E // r  # only the layer input (the residual stream, in the model dtype)
    saved = 2 * F * E // r  # the two layernorms' fp32 inputs
    saved += 2 * F * b * s // r  # their mean and 1/std
    saved += 2 * B * E  # the column-parallel GEMMs' inputs (layernorm outputs; all-gathered with SP)
    saved += 2 * B * E // r  # the two hidden-dropout masks (activation dtype on CPU)
    saved += 2 * 4 * B * E // t  # GeLU input and output, [s, b, 4h / t]
    if recompute == "selective":
        saved += 3 * B * E // t + B * E // t  # q, k, v (one qkv tensor) kept for the recompute; context
    else:
        saved += 3 * F * E // t + B * E // t  # fp32 q, k, v of the math SDPA; context
        saved += 3 * F * a * s * s * b // t  # softmax, dropout mask, dropped probabilities (fp32)
    if B != F:
        saved += 2 * 2 * F * h  # bf16: each layernorm's weight and bias cast to fp32
    return saved


def _storage_bytes(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _measure(parallel: ParallelState, variant: Variant, dtype: torch.dtype) -> dict[str, float]:
    model_parallel_seed(1234, parallel)
    config = TransformerConfig(
        num_layers=SHAPE["num_layers"], hidden_size=SHAPE["hidden_size"],
        num_attention_heads=SHAPE["num_attention_heads"], padded_vocab_size=SHAPE["vocab"],
        max_position_embeddings=SHAPE["seq_length"], recompute_granularity=variant.recompute,
        sequence_parallel=variant.sequence_parallel,
    )  # fmt: skip
    model = GPTModel(config, parallel).to(dtype)
    ddp = DistributedDataParallel(model, parallel, use_distributed_optimizer=variant.zero)
    optimizer = build_optimizer(
        ddp,
        OptimizerConfig(lr=1e-4, bf16=dtype == torch.bfloat16, use_distributed_optimizer=variant.zero),
        parallel,
    )
    params = _storage_bytes(model.parameters())
    s, b = SHAPE["seq_length"], SHAPE["micro_batch_size"]
    generator = torch.Generator().manual_seed(parallel.dp_rank)
    tokens = torch.randint(0, SHAPE["vocab"], (b, s), generator=generator)
    positions = torch.arange(s).expand(b, s)

    saved: dict[int, int] = {}
    counting = [False]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if counting[0]:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                saved.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    encoder = model.language_model.encoder
    encoder.register_forward_pre_hook(lambda *_: counting.__setitem__(0, True))
    encoder.final_layernorm.register_forward_pre_hook(lambda *_: counting.__setitem__(0, False))
    optimizer.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = ddp(tokens, positions, labels=tokens).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    optimizer.step()

    optimizer_tensors = [m for m in optimizer._main_params if m.untyped_storage().data_ptr() not in params]
    optimizer_tensors += [v for state in optimizer.optimizer.state.values() for v in state.values()]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "weights": sum(params.values()),
        "grads": ddp.grad_buffer.untyped_storage().nbytes(),
        "optimizer": sum(_storage_bytes(optimizer_tensors).values()),
        "activations": sum(saved.values()) / SHAPE["num_layers"],
    }


def _variants(tp: int, dp: int) -> list[Variant]:
    out = []
    for zero in [False, True] if dp > 1 else [False]:
        for sp in [False, True] if tp > 1 else [False]:
            for recompute in RECOMPUTE:
                out.append(Variant(zero, sp, recompute))
    return out


def _worker(rank: int, world: int, port: int, tp: int, dtype_name: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    parallel = initialize_model_parallel(tp)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    rows = [(v, _measure(parallel, v, dtype)) for v in _variants(tp, world // tp)]
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def _run_grid_point(tp: int, dp: int, dtype_name: str) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with socket.socket() as sock:  # a free port for this grid point's process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [
        ctx.Process(target=_worker, args=(r, tp * dp, port, tp, dtype_name, queue)) for r in range(tp * dp)
    ]
    for p in procs:
        p.start()
    rows = queue.get()
    for p in procs:
        p.join()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    B = 2 if args.dtype == "bf16" else 4
    mib = 1024 * 1024
    print(f"GPT {SHAPE}, {args.dtype}; MiB per rank, measured / formula")
    header = f"{'TP':>2} {'DP':>2} {'ZeRO':>4} {'SP':>3} {'recompute':>9} | {'weights':>13} | {'grads':>13} | {'optimizer':>13} | {'act/layer':>13} | act ratio | bytes/param"
    print(header)
    optimizer_dp1 = None
    for tp, dp in GRID:
        for variant, m in _run_grid_point(tp, dp, args.dtype):
            P = m["params"]
            weights, grads = B * P, 4 * P
            optimizer = (8 + (4 if B == 2 else 0)) * P / (dp if variant.zero else 1)
            act = activation_bytes_per_layer(tp, variant.sequence_parallel, variant.recompute, B)
            if (tp, dp, variant.recompute) == (1, 1, None):
                optimizer_dp1 = m["optimizer"]
            print(
                f"{tp:>2} {dp:>2} {'yes' if variant.zero else 'no':>4} {'yes' if variant.sequence_parallel else 'no':>3} "
                f"{variant.recompute or '-':>9} | {m['weights'] / mib:6.2f}/{weights / mib:6.2f} | "
                f"{m['grads'] / mib:6.2f}/{grads / mib:6.2f} | {m['optimizer'] / mib:6.2f}/{optimizer / mib:6.2f} | "
                f"{m['activations'] / mib:6.2f}/{act / mib:6.2f} | {m['activations'] / act:9.3f} | "
                f"{(m['weights'] + m['grads'] + m['optimizer']) / P:5.2f}/{(weights + grads + optimizer) / P:5.2f}"
            )
            if (tp, dp, variant.zero, variant.recompute) == (1, 4, True, None) and optimizer_dp1:
                print(f"   optimizer per rank, ZeRO at DP 4 / DP 1: {m['optimizer'] / optimizer_dp1:.3f}")


if __name__ == "__main__":
    main()
