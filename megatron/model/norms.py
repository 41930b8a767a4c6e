"""RMSNorm (Zhang & Sennrich 2019), the normalisation of the Llama family.

    y = x r w,    r = 1 / sqrt(mean(x^2) + eps)    over the last dimension (size d), no mean subtraction, no bias

Computed in fp32 and returned in the weight's dtype, like megatron.model.transformer.LayerNorm. It is
duplicated on every TP rank (each sees the full hidden vector). The parameter is `weight`, so the checkpoint
keys are those of LayerNorm without `.bias` (`input_layernorm.weight`, ...), as in Megatron-LM.

The backward is written out: for an incoming gradient g, with gw = g w,

    dx = r gw - x r^3 mean(gw x),        dw = sum over tokens of g x r

using row dot products (torch.linalg.vecdot) for mean(x^2) and mean(gw x), so that neither pass allocates a
temporary of x's size for a reduction; the autograd of the composite torch.nn.functional.rms_norm on CPU
allocates several (x^2, x r, and their gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        r = torch.linalg.vecdot(x, x).div_(x.size(-1)).add_(eps).rsqrt_().unsqueeze(-1)
        ctx.save_for_backward(x, weight, r)
        return (x * r).mul_(weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, weight, r = ctx.saved_tensors
        grad_weighted = grad * weight
        coefficient = torch.linalg.vecdot(grad_weighted, x).unsqueeze(-1).mul_(r.pow(3)).div_(x.size(-1))
        grad_x = grad_weighted.mul_(r).addcmul_(x, coefficient, value=-1.0)
        grad_w = (grad * r).mul_(x).flatten(0, -2).sum(0)
        return grad_x, grad_w, None


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm over the last dimension (normalized_shape = (d,), as build_norm makes it)."""

    def forward(self, x: Tensor) -> Tensor:
        eps = torch.finfo(torch.float32).eps if self.eps is None else self.eps
        return _RMSNormFunction.apply(x.float(), self.weight.float(), eps).to(self.weight.dtype)
