"""Forward and backward of the conjugate TP communication functions, and all-reduce counting."""

import torch

from megatron.parallel.mappings import (
    ALLREDUCE_COUNTER,
    copy_to_tensor_model_parallel_region,
    count_all_reduces,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.parallel.state import initialize_model_parallel
from tests.distributed_utils import run_distributed

FUNCTIONS = (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
)


def _per_rank(r: int, shape: tuple[int, ...], salt: int) -> torch.Tensor:
    """A tensor that differs between ranks and that every rank can recompute for any rank r."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(1000 * salt + r))


def _check_mappings(rank: int, world_size: int) -> None:
    state = initialize_model_parallel(world_size)
    group, p = state.tp_group, world_size
    shape = (3, 2 * p)
    ranks = range(p)

    # f: identity forward, all-reduce backward.
    x = _per_rank(rank, shape, 1).requires_grad_()
    y = copy_to_tensor_model_parallel_region(x, group)
    torch.testing.assert_close(y, x)
    y.backward(_per_rank(rank, shape, 2))
    torch.testing.assert_close(x.grad, sum(_per_rank(r, shape, 2) for r in ranks))

    # g: all-reduce forward, identity backward; the input itself is not modified.
    x = _per_rank(rank, shape, 3).requires_grad_()
    y = reduce_from_tensor_model_parallel_region(x, group)
    torch.testing.assert_close(y, sum(_per_rank(r, shape, 3) for r in ranks))
    torch.testing.assert_close(x.detach(), _per_rank(rank, shape, 3), rtol=0, atol=0)
    y.backward(_per_rank(rank, shape, 4))
    torch.testing.assert_close(x.grad, _per_rank(rank, shape, 4))

    # scatter: keep own chunk of the last dim forward, all-gather backward.
    x = _per_rank(0, shape, 5).requires_grad_()  # the same full tensor on all ranks
    y = scatter_to_tensor_model_parallel_region(x, group)
    torch.testing.assert_close(y, x.detach()[:, 2 * rank : 2 * rank + 2])
    y.backward(_per_rank(rank, (3, 2), 6))
    torch.testing.assert_close(x.grad, torch.cat([_per_rank(r, (3, 2), 6) for r in ranks], dim=-1))

    # gather: all-gather forward, keep own chunk backward.
    x = _per_rank(rank, (3, 2), 7).requires_grad_()
    y = gather_from_tensor_model_parallel_region(x, group)
    torch.testing.assert_close(y, torch.cat([_per_rank(r, (3, 2), 7) for r in ranks], dim=-1))
    upstream = _per_rank(0, shape, 8)
    y.backward(upstream)
    torch.testing.assert_close(x.grad, upstream[:, 2 * rank : 2 * rank + 2])

    # Counting: one all-reduce forward (g) and one backward (f); nothing counted outside the block.
    x = _per_rank(rank, shape, 9).requires_grad_()
    with count_all_reduces() as counter:
        hidden = copy_to_tensor_model_parallel_region(x, group) * 2.0
        out = reduce_from_tensor_model_parallel_region(hidden, group)
        assert (counter.forward, counter.backward) == (1, 0)
        out.sum().backward()
        assert (counter.forward, counter.backward) == (1, 1)
        reduce_from_tensor_model_parallel_region(x.detach(), group)
        assert (counter.forward, counter.backward) == (2, 1)
    reduce_from_tensor_model_parallel_region(x.detach(), group)
    assert (ALLREDUCE_COUNTER.forward, ALLREDUCE_COUNTER.backward) == (2, 1)
    assert not ALLREDUCE_COUNTER.enabled


def test_mappings_world4():
    run_distributed(_check_mappings, world_size=4)


def test_no_group_is_identity_and_counts_nothing():
    x = torch.randn(3, 4, requires_grad=True)
    with count_all_reduces() as counter:
        for fn in FUNCTIONS:
            y = fn(x, None)
            assert y is x
        (x * 3.0).sum().backward()
    assert (counter.forward, counter.backward) == (0, 0)
    # Each block starts from zero.
    ALLREDUCE_COUNTER.forward = 7
    with count_all_reduces() as counter:
        assert counter.forward == 0 and counter.enabled
