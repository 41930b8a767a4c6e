"""Forward and backward of the conjugate TP communication functions, and every collective they make."""

import torch

from megatron.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.parallel.state import initialize_model_parallel
from tests.collectives import record_collectives
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

    # g: all-reduce forward (in place, as Megatron-LM: no copy of the activation), identity backward.
    x = _per_rank(rank, shape, 3).requires_grad_()
    hidden = x * 1.0
    y = reduce_from_tensor_model_parallel_region(hidden, group)
    torch.testing.assert_close(y, sum(_per_rank(r, shape, 3) for r in ranks))
    assert y.data_ptr() == hidden.data_ptr(), "g copied its input"
    y.backward(_per_rank(rank, shape, 4))
    torch.testing.assert_close(x.grad, _per_rank(rank, shape, 4))
    strided = _per_rank(rank, (2 * p, 3), 3).t()  # a non-contiguous input is reduced into a new tensor
    torch.testing.assert_close(
        reduce_from_tensor_model_parallel_region(strided, group),
        sum(_per_rank(r, (2 * p, 3), 3) for r in ranks).t(),
    )

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

    # Every collective: one all-reduce over the TP group forward (g) and one backward (f), nothing else.
    x = _per_rank(rank, shape, 9).requires_grad_()
    with record_collectives() as calls:
        hidden = copy_to_tensor_model_parallel_region(x, group) * 2.0
        out = reduce_from_tensor_model_parallel_region(hidden, group)
        assert [(c.name, c.ranks, c.numel) for c in calls] == [("all_reduce", tuple(ranks), x.numel())]
        out.sum().backward()  # the gradient of sum() is an expanded tensor: f must not reduce it in place
    assert [(c.name, c.ranks) for c in calls] == [("all_reduce", tuple(ranks))] * 2
    torch.testing.assert_close(x.grad, torch.full(shape, 2.0 * p))


def test_mappings_world4():
    run_distributed(_check_mappings, world_size=4)


def test_no_group_is_identity_and_communicates_nothing():
    x = torch.randn(3, 4, requires_grad=True)
    with record_collectives() as calls:
        for fn in FUNCTIONS:
            y = fn(x, None)
            assert y is x
        (x * 3.0).sum().backward()
    assert list(calls) == []
