"""Point-to-point transfers between neighbouring pipeline stages.

A stage sends its output activations to the next stage (forward) and the gradient of its input to the
previous one (backward). Shapes are known from the configuration (micro batch x sequence x hidden), so a
receiver allocates its buffer without a shape exchange. Every call posts all its sends and receives in
one `torch.distributed.batch_isend_irecv` and waits for all of them: with NCCL that is one coalesced
group (no ordering deadlock between a pair of stages that both send and receive); with gloo each op is
an independent isend/irecv matched by (peer, tag), which is equally safe since nothing blocks before all
ops are posted. Peers wrap around the pipeline (the last stage's next is the first), which the
interleaved schedule uses to pass a microbatch from one virtual chunk to the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from megatron.parallel.state import ParallelState

# Tags keep activations and gradients apart when two stages exchange both in one call (PP = 2, where the
# previous and the next stage are the same rank); NCCL ignores tags and matches by posting order, which
# is the same on both sides (activations, then gradients).
_ACTIVATION_TAG, _GRADIENT_TAG = 1, 2


@dataclass(frozen=True)
class P2PConfig:
    """The shape and dtype of every activation (and gradient) passed between stages."""

    tensor_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def communicate(
    parallel: ParallelState,
    config: P2PConfig,
    send_next: Optional[Tensor] = None,
    send_prev: Optional[Tensor] = None,
    recv_prev: bool = False,
    recv_next: bool = False,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Send to / receive from the neighbouring stages at once; return (from previous, from next).

    `send_next`: this stage's output, to the next stage; `send_prev`: the gradient of this stage's input,
    to the previous one; `recv_prev` / `recv_next`: receive a tensor of config.tensor_shape from the
    previous / next stage. Receiving requires requires_grad=True on forward activations, set by the caller.
    """
    ops, from_prev, from_next = [], None, None
    if recv_prev:
        from_prev = torch.empty(config.tensor_shape, dtype=config.dtype, device=config.device)
        ops.append(dist.P2POp(dist.irecv, from_prev, parallel.prev_rank, tag=_ACTIVATION_TAG))
    if send_next is not None:
        ops.append(
            dist.P2POp(dist.isend, _checked(send_next, config), parallel.next_rank, tag=_ACTIVATION_TAG)
        )
    if recv_next:
        from_next = torch.empty(config.tensor_shape, dtype=config.dtype, device=config.device)
        ops.append(dist.P2POp(dist.irecv, from_next, parallel.next_rank, tag=_GRADIENT_TAG))
    if send_prev is not None:
        ops.append(dist.P2POp(dist.isend, _checked(send_prev, config), parallel.prev_rank, tag=_GRADIENT_TAG))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return from_prev, from_next


def _checked(tensor: Tensor, config: P2PConfig) -> Tensor:
    """The tensor to send, contiguous; a shape or dtype other than the configured one is a bug upstream."""
    if tuple(tensor.shape) != tuple(config.tensor_shape) or tensor.dtype != config.dtype:
        raise RuntimeError(
            f"pipeline send of {tuple(tensor.shape)} {tensor.dtype}, but stages exchange "
            f"{tuple(config.tensor_shape)} {config.dtype} (micro batch x sequence x hidden)"
        )
    return tensor.detach().contiguous()
