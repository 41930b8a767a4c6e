"""RMSNorm's hand-written backward (megatron.model.norms) against an independent computation."""

import torch

from megatron.model.norms import RMSNorm


def _reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * w, written out in float64."""
    x64, w64 = x.double(), weight.double()
    return x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * w64


def test_rmsnorm_value_and_gradients_match_the_written_out_formula():
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=g))
    x = (3 * torch.randn(2, 5, 16, generator=g)).requires_grad_()
    upstream = torch.randn(2, 5, 16, generator=g)
    y = norm(x)
    y.backward(upstream)
    x_ref = x.detach().double().requires_grad_()
    w_ref = norm.weight.detach().double().requires_grad_()
    expected = _reference(x_ref, w_ref, 1e-5)
    expected.backward(upstream.double())
    torch.testing.assert_close(y, expected.float())
    torch.testing.assert_close(x.grad, x_ref.grad.float())
    torch.testing.assert_close(norm.weight.grad, w_ref.grad.float())


def test_rmsnorm_gradcheck_float64():
    from megatron.model.norms import _RMSNormFunction

    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-6), (x, w))


def test_rmsnorm_bf16_weight_computes_in_fp32_and_returns_bf16():
    dtype = torch.bfloat16
    norm = RMSNorm(8, eps=1e-6, dtype=dtype)
    x = torch.randn(3, 8).to(dtype).requires_grad_()
    y = norm(x)
    assert y.dtype == dtype
    torch.testing.assert_close(
        y.float(), _reference(x.detach().float(), norm.weight.float(), 1e-6).float().to(dtype).float()
    )
    y.sum().backward()
    assert x.grad.dtype == dtype and norm.weight.grad.dtype == dtype
