"""Memory per rank, measured (live tensors) beside the formulas: weights, gradients, optimizer state, and
the activations a pipeline stage holds, for a fixed GPT at TP, PP, DP in {1, 2, 4}, with and without the
distributed optimizer (ZeRO-1), sequence parallelism and each recompute granularity.

    python benchmarks/memory.py                 # CPU, gloo: spawns TP x PP x DP processes per grid point
    python benchmarks/memory.py --dtype bf16

How it measures (on global rank 0 of each grid point: TP rank 0, DP rank 0, the FIRST pipeline stage; all
ranks of a stage agree up to padding): one global batch of m = 2 PP micro batches runs through the
training schedule (1F1B when PP > 1), then one optimizer step. weights = the bytes of the distinct
storages of the stage's parameters (with ZeRO the parameter buffer, including its padding to a multiple
of DP per bucket); gradients = the fp32 gradient buffer; optimizer = after the step, the distinct storages
of the torch optimizer's state (Adam moments, step counters) and of the fp32 master weights that are not
model parameters; activations = the peak, over the schedule, of the distinct storages saved for backward
(torch.autograd.graph.saved_tensors_hooks; a storage counts from the first time a transformer layer's
forward saves it until autograd releases the last saved reference to it), parameters excluded. CPU only
(gloo): the activation formula is this code's on CPU; on CUDA other SDPA kernels and 1-byte dropout
masks change it.

The formulas (bytes per rank; t = TP, p = PP, d = DP size; h hidden, V vocabulary, s sequence, L layers):
    parameters of the stage P = (L / p) (12 h^2 / t + 7 h / t + 6 h)   (per layer: QKV, dense, h->4h, 4h->h
        split over TP with their split biases; the row-parallel biases and two layernorms duplicated)
        + V h / t + s h on the first stage (word embedding split over the vocabulary, positions)
        + 2 h on the last (final layernorm) + V h / t on a last stage without the embedding (its copy of
        the tied word embedding, Megatron's word_embeddings_for_head);
    weights B P (B = 4 fp32, 2 bf16);  gradients 4 P;
    optimizer (8 + 4 [bf16: fp32 masters]) P, divided by d with ZeRO:  fp32 16 P -> 8 P + 8 P / d,
    bf16 18 P -> 6 P + 12 P / d  (Megatron's figure);
    activations held by the first stage: min(p, m) micro batches in flight under 1F1B (the first stage
        runs p - 1 warm-up forwards and one more forward before its first backward), each of its L / p
        layers holding the per-layer bytes below: p (L / p) x per layer = L x per layer, whatever p is.
Activations per layer, with E = s b h, r = t with sequence parallelism and 1 without, derived from the
tensors this code saves (listed in `activation_bytes_per_layer`). Megatron's paper counts 2-byte
activations, 1-byte dropout masks and the a s^2 b attention scores: sbh (34 + 5 a s / h) without
parallelism, sbh 34 / t with TP, sequence parallelism and selective recompute. Here, on CPU,
torch.nn.functional.dropout keeps its mask in the activation dtype (not 1 byte), the layernorms save their
fp32 input (and their fp32 mean and 1/std, 8 s b / r bytes), and scaled_dot_product_attention with dropout
takes the math path in fp32 (q, k, v copies and three a s^2 b tensors of 4 bytes: softmax, mask, dropped
probabilities). So with sequence parallelism and selective recompute the paper's 34 sbh / t (32 sbh / t
of 2-byte values + 2 sbh / t of 1-byte masks) reads, in this code's element sizes, (16 x 4 + 2 x 4) sbh / t
= 72 sbh / t in fp32 and (14 x 2 + 2 x 4 + 2 x 2) sbh / t = 40 sbh / t in bf16 (the layernorm inputs
fp32), plus the layernorm statistics. As in Megatron-LM, the column-parallel GEMMs keep only their s/t
positions of the input and all-gather them again in backward for the weight gradient
(megatron.parallel.layers), so every term is divided by t.
"""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron.distributed import DistributedDataParallel
from megatron.model import GPTModel, TransformerConfig
from megatron.optimizer import OptimizerConfig, build_optimizer
from megatron.parallel.pipeline_layout import stage_layouts
from megatron.parallel.random import model_parallel_seed
from megatron.parallel.state import ParallelState, initialize_model_parallel
from megatron.schedules import ScheduleConfig, get_forward_backward_func

SHAPE = dict(
    num_layers=4, hidden_size=256, num_attention_heads=8, seq_length=256, micro_batch_size=2, vocab=1024
)
GRID = [(1, 1, 1), (1, 1, 2), (1, 1, 4), (2, 1, 1), (4, 1, 1), (2, 1, 2), (1, 2, 1), (1, 4, 1), (2, 2, 1), (1, 2, 2)]  # fmt: skip
RECOMPUTE = (None, "selective", "full")


@dataclass
class Variant:
    zero: bool
    sequence_parallel: bool
    recompute: Optional[str]


def microbatches(pp: int) -> int:
    """Micro batches per global batch: 2 p, more than the p that 1F1B keeps in flight on the first stage."""
    return 2 * pp


def first_stage_parameters(t: int, p: int) -> int:
    """Parameters held by a TP rank of the first pipeline stage (module docstring)."""
    h, s, V, L = SHAPE["hidden_size"], SHAPE["seq_length"], SHAPE["vocab"], SHAPE["num_layers"]
    params = (L // p) * (12 * h * h // t + 7 * h // t + 6 * h) + V * h // t + s * h
    return params + (2 * h if p == 1 else 0)  # the final layernorm when the first stage is also the last


def activation_bytes_per_layer(t: int, sp: bool, recompute: Optional[str], dtype_bytes: int) -> int:
    """Bytes this code saves for backward per transformer layer and micro batch on CPU with dropout on
    (module docstring)."""
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
    saved += 2 * B * E // r  # the column-parallel GEMMs' inputs (layernorm outputs; s/t positions with SP)
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


class _Held:
    """A tensor saved for backward; tells its tracker when autograd releases it."""

    __slots__ = ("tensor", "tracker", "key")

    def __init__(self, tensor: torch.Tensor, tracker: _LiveSaved, key: int) -> None:
        self.tensor, self.tracker, self.key = tensor, tracker, key

    def __del__(self) -> None:
        self.tracker.release(self.key)


class _LiveSaved:
    """saved_tensors_hooks that sum the distinct storages saved while `counting` and not yet released by
    autograd (parameters excluded), and keep the peak of that sum."""

    def __init__(self, excluded: set[int]) -> None:
        self.excluded = excluded
        self.counting = self.in_schedule_forward = False
        self.refs: dict[int, int] = {}
        self.nbytes: dict[int, int] = {}
        self.live = self.peak = 0

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if not self.counting or key in self.excluded:
            return tensor
        if key not in self.refs:
            self.refs[key], self.nbytes[key] = 0, storage.nbytes()
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[key] += 1
        return _Held(tensor, self, key)

    @staticmethod
    def unpack(packed) -> torch.Tensor:
        return packed.tensor if isinstance(packed, _Held) else packed

    def release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.live -= self.nbytes.pop(key)


def _storage_bytes(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _count_transformer_layers(model: GPTModel, live: _LiveSaved) -> None:
    """Count what the stage's transformer layers save during the schedule's forwards (not the embedding,
    head or loss, nor a full recompute's transient forward in backward)."""
    encoder = model.language_model.encoder

    def stop(*_) -> None:  # after the last layer (a full recompute saves a layer's input once it returns)
        live.counting = False

    encoder.register_forward_pre_hook(lambda *_: setattr(live, "counting", live.in_schedule_forward))
    if encoder.final_layernorm is not None:
        encoder.final_layernorm.register_forward_pre_hook(stop)
    else:
        encoder.register_forward_hook(stop)


def _run_global_batch(model, ddp, parallel: ParallelState, variant: Variant, live: _LiveSaved, dtype) -> None:
    """m micro batches through the schedule (1F1B when PP > 1), the gradient sync, under `live`'s hooks."""
    s, b, h = SHAPE["seq_length"], SHAPE["micro_batch_size"], SHAPE["hidden_size"]
    m = microbatches(parallel.pp_size)
    generator = torch.Generator().manual_seed(parallel.dp_rank)
    batches = iter([torch.randint(0, SHAPE["vocab"], (b, s), generator=generator) for _ in range(m)])
    positions = torch.arange(s).expand(b, s)

    def forward_step(data, chunk):
        tokens = next(data)
        live.in_schedule_forward = True
        output = chunk(tokens, positions, labels=tokens)
        live.in_schedule_forward = False
        return output, lambda loss: (loss.float().mean(), {})

    seq = s // parallel.tp_size if variant.sequence_parallel else s
    config = ScheduleConfig(m, (b, seq, h), dtype, no_sync=ddp.no_sync)
    with torch.autograd.graph.saved_tensors_hooks(live.pack, live.unpack):
        get_forward_backward_func(parallel)(forward_step, batches, [model], config, parallel)
    ddp.finish_grad_sync()


def _measure(parallel: ParallelState, variant: Variant, dtype: torch.dtype) -> dict[str, float]:
    model_parallel_seed(1234, parallel)
    config = TransformerConfig(
        num_layers=SHAPE["num_layers"], hidden_size=SHAPE["hidden_size"],
        num_attention_heads=SHAPE["num_attention_heads"], padded_vocab_size=SHAPE["vocab"],
        max_position_embeddings=SHAPE["seq_length"], recompute_granularity=variant.recompute,
        sequence_parallel=variant.sequence_parallel,
    )  # fmt: skip
    stage = stage_layouts(SHAPE["num_layers"], parallel.pp_size)[parallel.pp_rank][0]
    model = GPTModel(config, parallel, stage=stage).to(dtype)
    ddp = DistributedDataParallel(model, parallel, use_distributed_optimizer=variant.zero)
    optimizer = build_optimizer(
        ddp,
        OptimizerConfig(lr=1e-4, bf16=dtype == torch.bfloat16, use_distributed_optimizer=variant.zero),
        parallel,
    )
    params = _storage_bytes(model.parameters())
    live = _LiveSaved(set(params))
    _count_transformer_layers(model, live)
    optimizer.zero_grad()
    _run_global_batch(model, ddp, parallel, variant, live, dtype)
    optimizer.step()

    optimizer_tensors = [m for m in optimizer._main_params if m.untyped_storage().data_ptr() not in params]
    optimizer_tensors += [v for state in optimizer.optimizer.state.values() for v in state.values()]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "weights": sum(params.values()),
        "grads": ddp.grad_buffer.untyped_storage().nbytes(),
        "optimizer": sum(_storage_bytes(optimizer_tensors).values()),
        "activations": live.peak,
        "layers": len(stage.layers),
    }


def _variants(tp: int, dp: int) -> list[Variant]:
    out = []
    for zero in [False, True] if dp > 1 else [False]:
        for sp in [False, True] if tp > 1 else [False]:
            for recompute in RECOMPUTE:
                out.append(Variant(zero, sp, recompute))
    return out


def _worker(rank: int, world: int, port: int, tp: int, pp: int, dtype_name: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    parallel = initialize_model_parallel(tp, pp)
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    rows = [(v, _measure(parallel, v, dtype)) for v in _variants(tp, world // (tp * pp))]
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def _run_grid_point(tp: int, pp: int, dp: int, dtype_name: str) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with socket.socket() as sock:  # a free port for this grid point's process group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    world = tp * pp * dp
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, tp, pp, dtype_name, queue)) for r in range(world)
    ]
    for p in procs:
        p.start()
    rows = queue.get()
    for p in procs:
        p.join()
    return rows


def _formulas(tp: int, pp: int, dp: int, variant: Variant, B: int) -> dict[str, float]:
    P = first_stage_parameters(tp, pp)
    in_flight = min(pp, microbatches(pp))  # 1F1B on the first stage
    per_layer = activation_bytes_per_layer(tp, variant.sequence_parallel, variant.recompute, B)
    return {
        "params": P,
        "weights": B * P,
        "grads": 4 * P,
        "optimizer": (8 + (4 if B == 2 else 0)) * P / (dp if variant.zero else 1),
        "activations": in_flight * (SHAPE["num_layers"] // pp) * per_layer,
        "per_layer": per_layer,
        "in_flight": in_flight,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()
    B = 2 if args.dtype == "bf16" else 4
    mib = 1024 * 1024
    print(f"GPT {SHAPE}, {args.dtype}; first pipeline stage, MiB per rank, measured/formula")
    print(
        f"{'TP':>2} {'PP':>2} {'DP':>2} {'ZeRO':>4} {'SP':>3} {'recompute':>9} | {'weights':>13} | {'grads':>13} | "
        f"{'optimizer':>13} | {'act held':>13} | act ratio | act/layer/mb | bytes/param"
    )
    optimizer_dp1, per_sbh = None, []
    for tp, pp, dp in GRID:
        for variant, m in _run_grid_point(tp, pp, dp, args.dtype):
            f = _formulas(tp, pp, dp, variant, B)
            per_layer = m["activations"] / (f["in_flight"] * m["layers"])
            if (tp, pp, dp, variant.recompute) == (1, 1, 1, None):
                optimizer_dp1 = m["optimizer"]
            print(
                f"{tp:>2} {pp:>2} {dp:>2} {'yes' if variant.zero else 'no':>4} "
                f"{'yes' if variant.sequence_parallel else 'no':>3} {variant.recompute or '-':>9} | "
                + " | ".join(f"{m[k] / mib:6.2f}/{f[k] / mib:6.2f}" for k in ("weights", "grads", "optimizer", "activations"))
                + f" | {m['activations'] / f['activations']:9.3f} | {per_layer / mib:12.3f} | "
                f"{(m['weights'] + m['grads'] + m['optimizer']) / f['params']:5.2f}/"
                f"{(f['weights'] + f['grads'] + f['optimizer']) / f['params']:5.2f}"
            )  # fmt: skip
            if (tp, pp, dp, variant.zero, variant.recompute) == (1, 1, 4, True, None) and optimizer_dp1:
                print(f"   optimizer per rank, ZeRO at DP 4 / DP 1: {m['optimizer'] / optimizer_dp1:.3f}")
            if variant.sequence_parallel and variant.recompute == "selective":
                sbh = SHAPE["seq_length"] * SHAPE["micro_batch_size"] * SHAPE["hidden_size"]
                grid = f"{tp}x{pp}x{dp}{' ZeRO' if variant.zero else ''}"
                per_sbh.append(f"{grid}: {per_layer * tp / sbh:.2f}")
    paper = 72 if B == 4 else 40
    print(
        f"SP + selective recompute, activation bytes per layer and micro batch in units of s b h / t "
        f"(TPxPPxDP): "
        f"{', '.join(per_sbh)}; the paper's 34 in this code's element sizes: {paper} (+ layernorm statistics)"
    )


if __name__ == "__main__":
    main()
