"""Microbatch schedules: no pipelining, 1F1B (PipeDream-Flush) and interleaved 1F1B (virtual stages).

Every schedule runs the m microbatches of one global batch through this rank's model chunk(s) and
accumulates their gradients; the loss of microbatch i on the last stage is loss_func(output_i) / m
(times the fp16 loss scale). The schedule owns the loss: the model's forward returns the per-token
losses (or, before the last stage, hidden states) and the entry script's `loss_func` averages them.

Notation for the timelines: F3 = forward of microbatch 3, B3 = its backward, p stages, m microbatches.

No pipelining (one stage):   F0 B0 F1 B1 ... F(m-1) B(m-1)

1F1B, p = 4, m = 8 (stage s does p - s - 1 warm-up forwards, then alternates one forward and one
backward, then drains the remaining backwards):

    stage 0:  F0 F1 F2 F3 B0 F4 B1 F5 B2 F6 B3 F7 B4 B5 B6 B7
    stage 1:     F0 F1 F2 B0 F3 B1 F4 B2 F5 B3 F6 B4 F7 B5 B6 B7
    stage 2:        F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 F6 B5 F7 B6 B7
    stage 3:           F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 F6 B6 F7 B7

Stage s keeps the activations of at most p - s <= p microbatches (GPipe keeps m), and the bubble (idle
time) of one iteration is (p - 1) / m of the ideal time.

Interleaved 1F1B, v virtual chunks per stage (chunk c of stage s holds model chunk c p + s; see
megatron.parallel.pipeline_layout): microbatches go through the chunks in groups of p, so stage s runs
F0.0 F1.0 .. F(p-1).0 F0.1 F1.1 .. (microbatch.chunk) with (p - s - 1) * 2 + (v - 1) * p warm-up forwards,
then 1F1B over (microbatch, chunk) pairs with backwards in reverse chunk order. The bubble shrinks to
(p - 1) / (v m) for v times more point-to-point traffic; m must be a multiple of p.

Point-to-point transfers are megatron.parallel.p2p (batch_isend_irecv, gloo and NCCL), posted without
waiting: a received tensor is waited for just before the forward or backward that reads it, and a send
just before the stage's next send in the same direction (and at the end of the schedule), so transfers
overlap compute instead of making each step wait for both neighbours (Megatron's overlap_p2p_comm). The
sends and receives of each step are batched as Megatron batches them, so neighbours' batches pair up
in the same order (NCCL matches by order within a pair of ranks); in the interleaved steady phase, as
in Megatron's overlapped schedule, the forward's batch (send the output, receive the next forward's
input) is posted before the backward runs, and the backward's batch before the next forward. A stage's
output is freed as soon as it has been posted (only its autograd graph is kept: the stage output is a
residual sum, whose backward does not read it; its memory goes when the send completes, by the next
send), so held activations are the stage-internal ones.

We do not use torch.distributed.pipelining: its schedules own the loss and the module split and would
need adapting for Megatron's tied embedding across the first and last stage (two copies whose gradients
are all-reduced), the entry scripts' forward_step/loss_func contract, DDP's no_sync gradient
accumulation and gloo; the schedules below are short and tested for exact equality with one process.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.variable import Variable

from megatron.parallel.p2p import P2PConfig, Transfer, post
from megatron.parallel.state import ParallelState

# forward_step(data_iterator, model_chunk) -> (output, loss_func); loss_func(output) -> (loss, {name: value})
ForwardStep = Callable[[Iterator, nn.Module], tuple[Any, Callable]]
LoggedStats = list[dict[str, Tensor]]


@dataclass
class ScheduleConfig:
    """What a schedule needs besides the model and data: sizes, and hooks into gradient accumulation.

    `tensor_shape`: [micro batch, sequence, hidden], the activations passed between stages, in `dtype`.
    `scale_loss`: the fp16 loss scaling (optimizer.scale_loss), identity otherwise. `no_sync`: a context
    in which backward accumulates gradients without starting the data-parallel all-reduce (DDP.no_sync);
    every backward but the rank's last runs inside it.
    """

    num_microbatches: int
    tensor_shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    forward_only: bool = False
    scale_loss: Callable[[Tensor], Tensor] = lambda loss: loss
    no_sync: Callable[[], AbstractContextManager] = nullcontext
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def p2p(self) -> P2PConfig:
        return P2PConfig(tuple(self.tensor_shape), self.dtype, self.device)


class _Stage:
    """One rank's chunks and the forward/backward of one microbatch on one of them."""

    def __init__(
        self,
        forward_step: ForwardStep,
        data_iterators: list[Iterator],
        chunks: list[nn.Module],
        config: ScheduleConfig,
        parallel: ParallelState,
    ) -> None:
        self.forward_step, self.data_iterators, self.chunks = forward_step, data_iterators, chunks
        self.config, self.parallel = config, parallel
        self.stats: LoggedStats = []
        self.backwards_left = config.num_microbatches * len(chunks)
        self.sending: dict[str, Optional[Transfer]] = {"next": None, "prev": None}

    def is_post_process(self, chunk: int) -> bool:
        return self.parallel.is_pp_last and chunk == len(self.chunks) - 1

    def activation(self, inbound: Optional[Transfer]) -> Optional[Tensor]:
        """The activation `inbound` receives from the previous stage (waited for here; None for the first
        stage), a leaf that collects the gradient of this stage's input."""
        input_tensor = None if inbound is None else inbound.from_prev()
        if input_tensor is not None and not self.config.forward_only:
            input_tensor.requires_grad_()
        return input_tensor

    def forward(self, chunk: int, inbound: Optional[Transfer]) -> Tensor:
        """Run microbatch forward on `chunk` from the activation `inbound` receives (None on the first
        chunk of the first stage); on the last chunk of the last stage return loss / m (scaled), else
        the hidden states."""
        model, input_tensor = self.chunks[chunk], self.activation(inbound)
        if input_tensor is not None:
            model.set_input_tensor(input_tensor)
        with torch.no_grad() if self.config.forward_only else nullcontext():
            output, loss_func = self.forward_step(self.data_iterators[chunk], model)
        if not self.is_post_process(chunk):
            return output
        loss, logged = loss_func(output)
        self.stats.append(logged)
        return self.config.scale_loss(loss / self.config.num_microbatches)

    def backward(
        self, inbound: Optional[Transfer], output_tensor: Tensor, grad_inbound: Optional[Transfer]
    ) -> Optional[Tensor]:
        """Backpropagate the gradient `grad_inbound` receives from the next stage (None, or nothing
        received: the output is the loss) through the chunk whose input `inbound` received; return
        d loss / d input."""
        input_tensor = self.activation(inbound)
        output_grad = None if grad_inbound is None else grad_inbound.from_next()
        self.backwards_left -= 1
        with self.config.no_sync() if self.backwards_left > 0 else nullcontext():
            if output_grad is None:
                torch.autograd.backward(output_tensor)
            else:  # the output's data was freed after sending: bypass the shape check of autograd.backward
                Variable._execution_engine.run_backward(
                    tensors=(output_tensor,),
                    grad_tensors=(output_grad,),
                    keep_graph=False,
                    create_graph=False,
                    inputs=(),
                    allow_unreachable=True,
                    accumulate_grad=True,
                )
        return None if input_tensor is None else input_tensor.grad

    def post(
        self,
        send_next: Optional[Tensor] = None,
        send_prev: Optional[Tensor] = None,
        recv_prev: bool = False,
        recv_next: bool = False,
    ) -> Transfer:
        """p2p.post, once the previous send in each direction this one sends in has completed: at most
        one send per direction is in flight, so a sent output's memory goes by the stage's next send."""
        sends = {"next": send_next, "prev": send_prev}
        for direction, tensor in sends.items():
            in_flight = self.sending[direction]
            if tensor is not None and in_flight is not None:
                in_flight.wait_sends()
        transfer = post(self.parallel, self.config.p2p(), send_next, send_prev, recv_prev, recv_next)
        for direction, tensor in sends.items():
            if tensor is not None:
                self.sending[direction] = transfer
        return transfer

    def finish(self) -> LoggedStats:
        """Wait for the sends still in flight; return the logged values of every microbatch."""
        for transfer in self.sending.values():
            if transfer is not None:
                transfer.wait_sends()
        return self.stats


def _free(output: Optional[Tensor]) -> None:
    """Release a sent output's memory; its grad_fn (the graph) stays for the backward."""
    if output is not None:
        output.data = torch.empty((1,), dtype=output.dtype, device=output.device)


def forward_backward_no_pipelining(
    forward_step: ForwardStep,
    data_iterator: Iterator,
    chunks: list[nn.Module],
    config: ScheduleConfig,
    parallel: ParallelState,
) -> LoggedStats:
    """F0 B0 F1 B1 ...: one stage, each microbatch's backward right after its forward; returns the
    logged values of every microbatch."""
    stage = _Stage(forward_step, [data_iterator], chunks, config, parallel)
    for _ in range(config.num_microbatches):
        loss = stage.forward(0, None)
        if not config.forward_only:
            stage.backward(None, loss, None)
    return stage.finish()


def forward_backward_pipelining_without_interleaving(
    forward_step: ForwardStep,
    data_iterator: Iterator,
    chunks: list[nn.Module],
    config: ScheduleConfig,
    parallel: ParallelState,
) -> LoggedStats:
    """1F1B (see the module docstring): p - s - 1 warm-up forwards on stage s, then one forward and one
    backward per step, then the remaining backwards. Returns the logged values (last stage only)."""
    stage = _Stage(forward_step, [data_iterator], chunks, config, parallel)
    m, first, last = config.num_microbatches, parallel.is_pp_first, parallel.is_pp_last
    num_warmup = min(parallel.pp_size - parallel.pp_rank - 1, m)
    inputs: list[Optional[Transfer]] = []  # the transfers that receive each held microbatch's input
    outputs: list[Tensor] = []

    for _ in range(num_warmup):
        inbound = stage.post(recv_prev=not first)
        output = stage.forward(0, inbound)
        stage.post(send_next=None if last else output)
        inputs.append(inbound)
        outputs.append(output)
        _free(None if last else output)

    inbound = stage.post(recv_prev=not first) if m > num_warmup else None
    for i in range(m - num_warmup):
        last_iteration = i == m - num_warmup - 1
        output = stage.forward(0, inbound)
        send = None if last else output
        if config.forward_only:
            stage.post(send_next=send)
            inbound = None if last_iteration else stage.post(recv_prev=not first)
            continue
        grad_inbound = stage.post(send_next=send, recv_next=not last)
        inputs.append(inbound)
        outputs.append(output)
        _free(send)
        input_grad = stage.backward(inputs.pop(0), outputs.pop(0), grad_inbound)
        send_prev = None if first else input_grad
        if last_iteration:
            stage.post(send_prev=send_prev)
            inbound = None
        else:
            inbound = stage.post(send_prev=send_prev, recv_prev=not first)

    if not config.forward_only:
        for _ in range(num_warmup):
            grad_inbound = stage.post(recv_next=not last)
            input_grad = stage.backward(inputs.pop(0), outputs.pop(0), grad_inbound)
            stage.post(send_prev=None if first else input_grad)
    return stage.finish()


class _ReplayIterator:
    """Each virtual chunk reads the same microbatches in the same order: chunk c's k-th next() returns
    the k-th batch of the shared source, read once and kept until the last chunk has read it."""

    def __init__(self, source: Iterator, cache: dict[int, Any], readers: list[int], chunk: int) -> None:
        self.source, self.cache, self.readers, self.chunk = source, cache, readers, chunk

    def __iter__(self) -> _ReplayIterator:
        return self

    def __next__(self) -> Any:
        k = self.readers[self.chunk]
        if k not in self.cache:
            self.cache[k] = next(self.source)
        self.readers[self.chunk] += 1
        batch = self.cache[k]
        if all(position > k for position in self.readers):
            del self.cache[k]
        return batch


def replay_iterators(source: Iterator, num_chunks: int) -> list[Iterator]:
    """One iterator per virtual chunk over the same sequence of microbatches from `source`."""
    cache: dict[int, Any] = {}
    readers = [0] * num_chunks
    return [_ReplayIterator(source, cache, readers, c) for c in range(num_chunks)]


class _Interleaved:
    """The per-chunk queues of the interleaved schedule: inputs (the transfers receiving them, None for
    the embedding chunk), outputs awaiting their backward, and output gradients (the transfers receiving
    them, None for the loss); step k of the
    forward (backward) sequence runs chunk `chunk_of(k)`, in groups of p microbatches per chunk."""

    def __init__(self, stage: _Stage, num_chunks: int, parallel: ParallelState) -> None:
        self.stage, self.v, self.p = stage, num_chunks, parallel.pp_size
        self.first, self.last = parallel.is_pp_first, parallel.is_pp_last
        self.inputs: list[list[Optional[Transfer]]] = [[] for _ in range(num_chunks)]
        self.outputs: list[list[Tensor]] = [[] for _ in range(num_chunks)]
        self.output_grads: list[list[Optional[Transfer]]] = [[] for _ in range(num_chunks)]

    def chunk_of(self, k: int, forward: bool) -> int:
        c = (k % (self.p * self.v)) // self.p
        return c if forward else self.v - c - 1

    def forward(self, k: int) -> Optional[Tensor]:
        """Forward step k; returns the output to send on (None on the last chunk of the last stage)."""
        c = self.chunk_of(k, True)
        if self.first and c == 0:  # the embedding chunk reads its input from the data, not from a stage
            self.inputs[0].append(None)
        output = self.stage.forward(c, self.inputs[c][-1])
        self.outputs[c].append(output)
        return None if self.stage.is_post_process(c) else output

    def backward(self, k: int) -> Optional[Tensor]:
        """Backward step k; returns the input gradient to send back (None on the embedding chunk)."""
        c = self.chunk_of(k, False)
        if self.stage.is_post_process(c):
            self.output_grads[c].append(None)
        grad = self.stage.backward(self.inputs[c].pop(0), self.outputs[c].pop(0), self.output_grads[c].pop(0))
        return None if (self.first and c == 0) else grad

    def steady_receivers(self, fk: int, bk: int) -> tuple[bool, int, bool, int]:
        """After forward step fk and backward step bk of the steady phase: (receive an activation, for
        which chunk; receive a gradient, for which chunk). The first stage's chunk 0 reads data, and the
        last stage's last chunk computes its own gradient, so those are never received."""
        recv_prev, recv_next = True, True
        if self.first:
            next_forward = self.chunk_of(fk - (self.p - 1), True)
            recv_prev = next_forward != self.v - 1
            next_forward += 1
        else:
            next_forward = self.chunk_of(fk + 1, True)
        if self.last:
            next_backward = self.chunk_of(bk - (self.p - 1), False)
            recv_next = next_backward != 0
            next_backward -= 1
        else:
            next_backward = self.chunk_of(bk + 1, False)
        return recv_prev, next_forward, recv_next, next_backward


def forward_backward_pipelining_with_interleaving(
    forward_step: ForwardStep,
    data_iterator: Iterator,
    chunks: list[nn.Module],
    config: ScheduleConfig,
    parallel: ParallelState,
) -> LoggedStats:
    """Interleaved 1F1B over v = len(chunks) virtual chunks (see the module docstring): warm-up forwards,
    a steady phase of one forward and one backward per step (each followed by its own transfers), then
    the remaining backwards."""
    v, p, m = len(chunks), parallel.pp_size, config.num_microbatches
    if m % p != 0:
        raise ValueError(
            f"the interleaved schedule needs the number of microbatches ({m}) to be a multiple of "
            f"--pipeline-model-parallel-size {p}"
        )
    stage = _Stage(forward_step, replay_iterators(data_iterator, v), chunks, config, parallel)
    run = _Interleaved(stage, v, parallel)
    first, last, total = parallel.is_pp_first, parallel.is_pp_last, m * v
    all_warmup = config.forward_only or m == p
    num_warmup = total if all_warmup else min((p - parallel.pp_rank - 1) * 2 + (v - 1) * p, total)

    if not first:
        run.inputs[0].append(stage.post(recv_prev=True))
    for k in range(num_warmup):
        send = run.forward(k)
        next_chunk = run.chunk_of(k + 1, True)
        recv_prev = not (first and next_chunk == 0) and k != total - 1
        recv_next = k == num_warmup - 1 and not all_warmup and not last
        transfer = stage.post(send_next=send, recv_prev=recv_prev, recv_next=recv_next)
        if recv_next:
            run.output_grads[v - 1].append(transfer)
        if recv_prev:
            run.inputs[next_chunk].append(transfer)
        _free(send)

    steady = total - num_warmup
    for k in range(steady):
        recv_prev, next_forward, recv_next, next_backward = run.steady_receivers(k + num_warmup, k)
        send = run.forward(k + num_warmup)
        if recv_prev and k != steady - 1:
            run.inputs[next_forward].append(stage.post(send_next=send, recv_prev=True))
        else:
            stage.post(send_next=send)
        _free(send)
        transfer = stage.post(send_prev=run.backward(k), recv_next=recv_next)
        if recv_next:
            run.output_grads[next_backward].append(transfer)

    if config.forward_only:
        return stage.finish()
    if all_warmup and not last:
        run.output_grads[v - 1].append(stage.post(recv_next=True))
    for k in range(steady, total):
        send_prev = run.backward(k)
        next_backward = run.chunk_of(k + 1, False)
        recv_next = not (last and next_backward == v - 1) and k != total - 1
        transfer = stage.post(send_prev=send_prev, recv_next=recv_next)
        if recv_next:
            run.output_grads[next_backward].append(transfer)
    return stage.finish()


def get_forward_backward_func(parallel: ParallelState, num_chunks: int = 1) -> Callable[..., LoggedStats]:
    """The schedule for this grid: no pipelining (PP = 1), 1F1B, or interleaved 1F1B (v > 1 chunks)."""
    if parallel.pp_size == 1:
        return forward_backward_no_pipelining
    if num_chunks > 1:
        return forward_backward_pipelining_with_interleaving
    return forward_backward_pipelining_without_interleaving


def broadcast_from_last_stage(values: dict[str, float], parallel: ParallelState) -> dict[str, float]:
    """The last stage's logged values on every stage of the pipeline (one broadcast over the pipeline
    group), so that all stages log, return and check for NaN the same numbers."""
    if parallel.pp_size == 1:
        return values
    box = [values if parallel.is_pp_last else None]
    dist.broadcast_object_list(box, src=parallel.pipeline_ranks[-1], group=parallel.pp_group)
    return box[0]
