"""Point-to-point transfers between neighbouring pipeline stages.

A stage sends its output activations to the next stage (forward) and the gradient of its input to the
previous one (backward). Shapes are known from the configuration (micro batch x sequence x hidden), so a
receiver allocates its buffer without a shape exchange. `post` puts all the sends and receives of one
step in one `torch.distributed.batch_isend_irecv` and returns at once with a `Transfer`: with NCCL that is
one coalesced group (no ordering deadlock between a pair of stages that both send and receive); with
gloo each op is an independent isend/irecv matched by (peer, tag), which is equally safe since nothing
blocks before all ops are posted. The caller waits for a received tensor when it reads it (just before
the compute that uses it) and for its sends before it reuses or drops what they send, so transfers run
while the stage computes. This matters on gloo, whose send is a rendezvous: it completes only once the
peer has posted the matching receive, so waiting for a whole step's sends and receives at once ties the
stage to both neighbours reaching the same step. `communicate` posts and waits at once. Peers wrap
around the pipeline (the last stage's next is the first), which the interleaved schedule uses to pass a
microbatch from one virtual chunk to the next.
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
# is the same on both sides (activations, then gradients; tests/test_pipeline_schedules.py also runs the
# schedules with a single tag, so that gloo pairs by order too).
_ACTIVATION_TAG, _GRADIENT_TAG = 1, 2


@dataclass(frozen=True)
class P2PConfig:
    """The shape and dtype of every activation (and gradient) passed between stages."""

    tensor_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


class Transfer:
    """The sends and receives of one `post`, in flight. `from_prev()` / `from_next()` wait for that one
    receive (the first call) and return the received tensor; `wait_sends()` waits for the sends.

    With gloo every op has its own request, so reading one received tensor does not wait for the other
    or for the sends; with NCCL the batch is one coalesced request, and waiting for it only orders the
    current stream after the whole transfer, without blocking the host.
    """

    def __init__(
        self,
        ops: list[dist.P2POp],
        requests: list[dist.Work],
        from_prev: Optional[Tensor],
        from_next: Optional[Tensor],
    ) -> None:
        if len(requests) == len(ops):
            roles = [
                "send" if op.op is dist.isend else "prev" if op.tensor is from_prev else "next" for op in ops
            ]
            self._requests = {
                role: [r for r, other in zip(requests, roles) if other == role] for role in roles
            }
        else:  # one coalesced request for the whole batch
            self._requests = {role: list(requests) for role in ("send", "prev", "next")}
        self._from_prev, self._from_next = from_prev, from_next

    def from_prev(self) -> Optional[Tensor]:
        """The tensor received from the previous stage (None if none was asked for), once it is here."""
        self._wait("prev")
        return self._from_prev

    def from_next(self) -> Optional[Tensor]:
        """The tensor received from the next stage (None if none was asked for), once it is here."""
        self._wait("next")
        return self._from_next

    def wait_sends(self) -> None:
        """Return once the peers have the sent tensors (their memory may then be released)."""
        self._wait("send")

    def _wait(self, role: str) -> None:
        requests = self._requests.get(role, [])
        while requests:
            requests.pop(0).wait()


def post(
    parallel: ParallelState,
    config: P2PConfig,
    send_next: Optional[Tensor] = None,
    send_prev: Optional[Tensor] = None,
    recv_prev: bool = False,
    recv_next: bool = False,
) -> Transfer:
    """Start sending to / receiving from the neighbouring stages; return the transfer in flight.

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
    return Transfer(ops, dist.batch_isend_irecv(ops) if ops else [], from_prev, from_next)


def communicate(
    parallel: ParallelState,
    config: P2PConfig,
    send_next: Optional[Tensor] = None,
    send_prev: Optional[Tensor] = None,
    recv_prev: bool = False,
    recv_next: bool = False,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """`post` and wait for everything: return (from previous, from next) once the sends are delivered."""
    transfer = post(parallel, config, send_next, send_prev, recv_prev, recv_next)
    transfer.wait_sends()
    return transfer.from_prev(), transfer.from_next()


def _checked(tensor: Tensor, config: P2PConfig) -> Tensor:
    """The tensor to send, contiguous; a shape or dtype other than the configured one is a bug upstream."""
    if tuple(tensor.shape) != tuple(config.tensor_shape) or tensor.dtype != config.dtype:
        raise RuntimeError(
            f"pipeline send of {tuple(tensor.shape)} {tensor.dtype}, but stages exchange "
            f"{tuple(config.tensor_shape)} {config.dtype} (micro batch x sequence x hidden)"
        )
    return tensor.detach().contiguous()
