"""Vocab-parallel cross entropy equals F.cross_entropy on the full logits, in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from megatron.parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_range_from_global_vocab_size
from megatron.parallel.state import initialize_model_parallel
from tests.distributed_utils import run_distributed

VOCAB = 24


def _problem(salt: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full logits [2, 5, V] (large when scale is large, to exercise the max shift), targets, upstream grads."""
    g = torch.Generator().manual_seed(salt)
    logits = scale * torch.randn(2, 5, VOCAB, generator=g)
    target = torch.randint(0, VOCAB, (2, 5), generator=g)
    target[0, :4] = torch.tensor([0, VOCAB // 2 - 1, VOCAB // 2, VOCAB - 1])  # partition edges
    return logits, target, torch.rand(2, 5, generator=g)


def _check_against_reference(
    tp_size: int, tp_rank: int, group, salt: int, scale: float, overwrite: bool = False
) -> None:
    logits, target, upstream = _problem(salt, scale)
    start, end = vocab_range_from_global_vocab_size(VOCAB, tp_rank, tp_size)
    shard = logits[..., start:end].clone().requires_grad_()
    full = logits.clone().requires_grad_()

    # With `overwrite` the function gets a non-leaf of its own (like the model's logits) and may reuse it.
    loss = vocab_parallel_cross_entropy(
        shard * 1.0 if overwrite else shard, target, group, overwrite_logits=overwrite
    )
    expected = F.cross_entropy(full.view(-1, VOCAB), target.view(-1), reduction="none").view(2, 5)
    assert loss.dtype == torch.float32 and loss.shape == (2, 5)
    torch.testing.assert_close(loss, expected)
    loss.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(shard.grad, full.grad[..., start:end])


def _check_cross_entropy(rank: int, world_size: int) -> None:
    for tp in (4, 2):
        state = initialize_model_parallel(tp)
        for salt, scale, overwrite in ((1, 1.0, False), (2, 30.0, False), (3, 1000.0, True)):
            _check_against_reference(
                tp, state.tp_rank, state.tp_group, salt + 10 * state.dp_rank, scale, overwrite
            )


def test_cross_entropy_tp4_and_tp2():
    run_distributed(_check_cross_entropy, world_size=4)


def test_cross_entropy_single_process():
    _check_against_reference(1, 0, None, salt=3, scale=1.0)
    _check_against_reference(1, 0, None, salt=4, scale=1000.0)
    _check_against_reference(1, 0, None, salt=5, scale=1.0, overwrite=True)
    _check_against_reference(1, 0, None, salt=6, scale=1000.0, overwrite=True)


def test_overwritten_logits_give_finite_loss_and_gradient_for_extreme_logits():
    """Logits 10^4 apart: the max shift keeps exp, the loss and softmax - onehot finite, in the reused buffer."""
    logits = torch.tensor([[1.0e4, 0.0, -1.0e4, 5.0]])
    target = torch.tensor([2])
    leaf = logits.clone().requires_grad_()
    work = leaf * 1.0
    grad_storage = []
    work.register_hook(lambda grad: grad_storage.append(grad.data_ptr()))
    loss = vocab_parallel_cross_entropy(work, target, None, overwrite_logits=True)
    assert loss.item() == 2.0e4  # log(1 + e^-1e4 + ...) + 1e4 - (-1e4), exactly in fp32
    loss.backward()
    torch.testing.assert_close(leaf.grad, torch.tensor([[1.0, 0.0, -1.0, 0.0]]))
    assert grad_storage == [work.data_ptr()]  # the gradient was computed in the logits' own buffer


def test_overwrite_fails_loudly_when_the_logits_were_saved_by_autograd():
    """exp() saves its output: overwriting it must make the backward fail, not silently use wrong numbers."""
    logits, target, _ = _problem(7, 1.0)
    saved = logits.requires_grad_().exp()
    loss = vocab_parallel_cross_entropy(saved, target, None, overwrite_logits=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.sum().backward()


def test_low_precision_logits_give_fp32_loss_and_same_dtype_grad():
    logits, target, _ = _problem(5, 1.0)
    half = logits.to(torch.bfloat16).requires_grad_()
    loss = vocab_parallel_cross_entropy(half, target, None)
    assert loss.dtype == torch.float32
    expected = F.cross_entropy(half.detach().float().view(-1, VOCAB), target.view(-1), reduction="none")
    torch.testing.assert_close(loss.view(-1), expected)
    loss.sum().backward()
    assert half.grad.dtype == torch.bfloat16


def test_vocab_range():
    assert vocab_range_from_global_vocab_size(12, 0, 4) == (0, 3)
    assert vocab_range_from_global_vocab_size(12, 3, 4) == (9, 12)
    assert vocab_range_from_global_vocab_size(12, 0, 1) == (0, 12)
    with pytest.raises(ValueError, match="vocabulary size 10 is not divisible by the tensor-parallel size 4"):
        vocab_range_from_global_vocab_size(10, 0, 4)
