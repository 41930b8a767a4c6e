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


def _check_against_reference(tp_size: int, tp_rank: int, group, salt: int, scale: float) -> None:
    logits, target, upstream = _problem(salt, scale)
    start, end = vocab_range_from_global_vocab_size(VOCAB, tp_rank, tp_size)
    shard = logits[..., start:end].clone().requires_grad_()
    full = logits.clone().requires_grad_()

    loss = vocab_parallel_cross_entropy(shard, target, group)
    expected = F.cross_entropy(full.view(-1, VOCAB), target.view(-1), reduction="none").view(2, 5)
    assert loss.dtype == torch.float32 and loss.shape == (2, 5)
    torch.testing.assert_close(loss, expected)
    loss.backward(upstream)
    expected.backward(upstream)
    torch.testing.assert_close(shard.grad, full.grad[..., start:end])


def _check_cross_entropy(rank: int, world_size: int) -> None:
    for tp in (4, 2):
        state = initialize_model_parallel(tp)
        for salt, scale in ((1, 1.0), (2, 30.0)):
            _check_against_reference(tp, state.tp_rank, state.tp_group, salt + 10 * state.dp_rank, scale)


def test_cross_entropy_tp4_and_tp2():
    run_distributed(_check_cross_entropy, world_size=4)


def test_cross_entropy_single_process():
    _check_against_reference(1, 0, None, salt=3, scale=1.0)
    _check_against_reference(1, 0, None, salt=4, scale=1000.0)


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
