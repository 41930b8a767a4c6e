"""SwiGLU on the fused [gate; up] output of one column-parallel layer, with a hand-written backward.

For the last dimension of x split into halves x = [g, u] (each f wide),

    y = silu(g) * u,                                   silu(g) = g sigmoid(g)

and, for an incoming gradient dy,

    dg = dy * u * silu'(g),    silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g)))
    du = dy * silu(g)

Only x is saved (silu(g) is recomputed in the backward, as Megatron-LM's fused SwiGLU does), and dg and du
are written straight into the two halves of one [..., 2f] gradient buffer. Autograd of
`F.silu(g) * u` on the chunks would keep silu(g) alive, allocate dg, du and the products separately and
concatenate them: three more fresh buffers of x's half size per layer and an extra pass over the gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        gate, up = x.chunk(2, dim=-1)
        ctx.save_for_backward(x)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        gate, up = x.chunk(2, dim=-1)
        grad_x = torch.empty_like(x)
        grad_gate, grad_up = grad_x.chunk(2, dim=-1)
        torch.ops.aten.silu.out(gate, out=grad_up).mul_(grad_output)
        torch.mul(grad_output, up, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)  # times silu'(gate)
        return grad_x


def swiglu(x: Tensor) -> Tensor:
    """silu(g) * u for x = [g, u] split in halves along the last dimension: [..., 2f] -> [..., f]."""
    return _SwiGLU.apply(x)
