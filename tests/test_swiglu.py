"""The fused SwiGLU of megatron.model.swiglu equals autograd of silu(g) * u on the halves, value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from megatron.model.swiglu import swiglu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_autograd_of_the_unfused_expression(dtype):
    g = torch.Generator().manual_seed(0)
    x = (4 * torch.randn(3, 5, 2 * 7, generator=g)).to(dtype)
    upstream = torch.randn(3, 5, 7, generator=g).to(dtype)
    fused_in, ref_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused = swiglu(fused_in)
    gate, up = ref_in[..., :7], ref_in[..., 7:]
    if dtype == torch.float32:
        expected = gate * torch.sigmoid(gate) * up  # written out, not F.silu, as an independent reference
    else:  # bf16 rounds every intermediate: compare with the unfused expression the model used before
        expected = F.silu(gate) * up
    torch.testing.assert_close(fused, expected)
    fused.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(fused_in.grad, ref_in.grad)


def test_swiglu_gradcheck_float64():
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (x,))


def test_swiglu_of_a_strided_input():
    """The halves of a non-contiguous x (a slice of a wider tensor) are read correctly."""
    wide = torch.randn(4, 20, dtype=torch.float64, requires_grad=True)
    x = wide[:, 2:14]
    gate, up = x[:, :6], x[:, 6:]
    torch.testing.assert_close(swiglu(x), F.silu(gate) * up)
    assert torch.autograd.gradcheck(swiglu, (x,))
