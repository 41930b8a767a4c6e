"""Tensor-parallel layers equal their single-process counterparts: outputs, input grads, weight grads.

Each rank builds the TP layer after torch.manual_seed(s) and, after the same seed, a TP=1 layer holding the
full weights; the TP shards must equal slices of the full weights, and outputs/gradients must equal those
of the plain F.linear / F.embedding on the full weights. Inputs differ across DP ranks.
"""

import pytest
import torch
import torch.nn.functional as F

from megatron.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    param_is_not_tensor_parallel_duplicate,
)
from megatron.parallel.state import ParallelState, initialize_model_parallel, single_process_state
from tests.collectives import group_ranks, record_collectives
from tests.distributed_utils import run_distributed

IN, OUT, VOCAB, BATCH = 8, 12, 16, (2, 3)


def _full_and_sharded(cls, args: tuple, seed: int, parallel: ParallelState, **kwargs):
    torch.manual_seed(seed)
    layer = cls(*args, parallel=parallel, **kwargs)
    torch.manual_seed(seed)
    full = cls(*args, parallel=single_process_state(), **kwargs)
    # Give the (zero-initialised) biases non-trivial values that are slices of the same full bias.
    if getattr(full, "bias", None) is not None:
        with torch.no_grad():
            full.bias.copy_(torch.randn(full.bias.shape, generator=torch.Generator().manual_seed(seed)))
            dim = layer.bias.partition_dim
            layer.bias.copy_(_shard(full.bias, dim, parallel) if dim is not None else full.bias)
    return layer, full


def _shard(t: torch.Tensor, dim: int, parallel: ParallelState) -> torch.Tensor:
    return torch.chunk(t, parallel.tp_size, dim=dim)[parallel.tp_rank]


def _inputs(parallel: ParallelState, salt: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Same on the ranks of a TP group, different across DP ranks."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 * salt + parallel.dp_rank))


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def _check_column(parallel: ParallelState) -> None:
    for gather_output in (False, True):
        layer, full = _full_and_sharded(
            ColumnParallelLinear, (IN, OUT), 11, parallel, gather_output=gather_output
        )
        assert layer.weight.shape == (OUT // parallel.tp_size, IN)
        assert torch.equal(layer.weight, _shard(full.weight, 0, parallel))
        assert layer.weight.tensor_model_parallel and layer.weight.partition_dim == 0
        assert layer.bias.tensor_model_parallel and layer.bias.partition_dim == 0

        x = _inputs(parallel, 1, (*BATCH, IN)).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        upstream = _inputs(parallel, 2, (*BATCH, OUT))
        y, bias = layer(x)
        y_ref = F.linear(x_ref, full.weight, full.bias)
        assert bias is None
        if gather_output:
            _close(y, y_ref)
            y.backward(upstream)
        else:
            _close(y, _shard(y_ref, -1, parallel))
            y.backward(_shard(upstream, -1, parallel))
        y_ref.backward(upstream)
        _close(x.grad, x_ref.grad)
        _close(layer.weight.grad, _shard(full.weight.grad, 0, parallel))
        _close(layer.bias.grad, _shard(full.bias.grad, 0, parallel))

    layer, full = _full_and_sharded(ColumnParallelLinear, (IN, OUT), 12, parallel, skip_bias_add=True)
    x = _inputs(parallel, 3, (*BATCH, IN))
    y, bias = layer(x)
    assert bias is layer.bias
    _close(y, _shard(F.linear(x, full.weight), -1, parallel))


def _check_row(parallel: ParallelState) -> None:
    for input_is_parallel in (True, False):
        layer, full = _full_and_sharded(
            RowParallelLinear, (OUT, IN), 21, parallel, input_is_parallel=input_is_parallel
        )
        assert layer.weight.shape == (IN, OUT // parallel.tp_size)
        assert torch.equal(layer.weight, _shard(full.weight, 1, parallel))
        assert layer.weight.tensor_model_parallel and layer.weight.partition_dim == 1
        assert not layer.bias.tensor_model_parallel and layer.bias.shape == (IN,)
        assert param_is_not_tensor_parallel_duplicate(layer.weight, parallel)
        assert param_is_not_tensor_parallel_duplicate(layer.bias, parallel) == (parallel.tp_rank == 0)

        x_full = _inputs(parallel, 4, (*BATCH, OUT))
        x = (x_full if not input_is_parallel else _shard(x_full, -1, parallel)).clone().requires_grad_()
        x_ref = x_full.clone().requires_grad_()
        upstream = _inputs(parallel, 5, (*BATCH, IN))
        y, bias = layer(x)
        y_ref = F.linear(x_ref, full.weight, full.bias)
        assert bias is None
        _close(y, y_ref)
        y.backward(upstream)
        y_ref.backward(upstream)
        _close(x.grad, x_ref.grad if not input_is_parallel else _shard(x_ref.grad, -1, parallel))
        _close(layer.weight.grad, _shard(full.weight.grad, 1, parallel))
        _close(layer.bias.grad, full.bias.grad)

    layer, full = _full_and_sharded(RowParallelLinear, (OUT, IN), 22, parallel, skip_bias_add=True, bias=True)
    x_full = _inputs(parallel, 6, (*BATCH, OUT))
    y, bias = layer(_shard(x_full, -1, parallel))
    assert bias is layer.bias
    _close(y, F.linear(x_full, full.weight))


def _check_embedding(parallel: ParallelState) -> None:
    layer, full = _full_and_sharded(VocabParallelEmbedding, (VOCAB, IN), 31, parallel)
    assert layer.weight.shape == (VOCAB // parallel.tp_size, IN)
    assert torch.equal(layer.weight, _shard(full.weight, 0, parallel))
    assert layer.weight.tensor_model_parallel and layer.weight.partition_dim == 0
    ids = torch.cat(
        [torch.arange(VOCAB), torch.randint(0, VOCAB, (8,), generator=torch.Generator().manual_seed(7))]
    )
    ids = ids.view(2, -1)
    out = layer(ids)
    out_ref = F.embedding(ids, full.weight)
    _close(out, out_ref)
    upstream = _inputs(parallel, 7, out.shape)
    out.backward(upstream)
    out_ref.backward(upstream)
    _close(layer.weight.grad, _shard(full.weight.grad, 0, parallel))


def _check_all_reduce_count(parallel: ParallelState) -> None:
    """A column -> row block (an MLP) makes one all-reduce over the TP group forward and one backward when
    TP > 1, and no other collective."""
    torch.manual_seed(41)
    column = ColumnParallelLinear(IN, OUT, parallel=parallel)
    row = RowParallelLinear(OUT, IN, parallel=parallel)
    x = _inputs(parallel, 8, (*BATCH, IN)).requires_grad_()
    expected = [("all_reduce", group_ranks(parallel.tp_group))] if parallel.tp_size > 1 else []
    with record_collectives() as calls:
        y, _ = row(F.gelu(column(x)[0]))
        forward = [(c.name, c.ranks) for c in calls]
        y.sum().backward()
    assert forward == expected
    assert [(c.name, c.ranks) for c in calls] == expected * 2


def _check_layers(rank: int, world_size: int, tp_sizes: tuple[int, ...]) -> None:
    for tp in tp_sizes:
        parallel = initialize_model_parallel(tp)
        _check_column(parallel)
        _check_row(parallel)
        _check_embedding(parallel)
        _check_all_reduce_count(parallel)


@pytest.mark.parametrize("world_size, tp_sizes", [(1, (1,)), (2, (2, 1)), (4, (4, 2))])
def test_layers_match_single_process(world_size, tp_sizes):
    run_distributed(_check_layers, world_size=world_size, args=(tp_sizes,))


def test_sizes_not_divisible_by_tp():
    parallel = ParallelState(tp_group=None, dp_group=None, tp_rank=0, tp_size=3, dp_rank=0, dp_size=1)
    with pytest.raises(ValueError, match=r"ColumnParallelLinear output_size \(8\) is not divisible .* \(3\)"):
        ColumnParallelLinear(4, 8, parallel=parallel)
    with pytest.raises(ValueError, match=r"RowParallelLinear input_size \(8\) is not divisible .* \(3\)"):
        RowParallelLinear(8, 4, parallel=parallel)
    with pytest.raises(ValueError, match="vocabulary size 8 is not divisible by the tensor-parallel size 3"):
        VocabParallelEmbedding(8, 4, parallel=parallel)
    with pytest.raises(ValueError, match="gather_output with skip_bias_add"):
        ColumnParallelLinear(4, 8, parallel=single_process_state(), gather_output=True, skip_bias_add=True)


def test_params_dtype_and_no_bias():
    torch.manual_seed(0)
    layer = ColumnParallelLinear(
        4, 8, parallel=single_process_state(), bias=False, params_dtype=torch.bfloat16
    )
    assert layer.weight.dtype == torch.bfloat16 and layer.bias is None
    y, bias = layer(torch.randn(2, 4, dtype=torch.bfloat16))
    assert y.shape == (2, 8) and bias is None
    row = RowParallelLinear(8, 4, parallel=single_process_state(), bias=False, init_std=0.5)
    assert row.bias is None and 0.3 < row.weight.std().item() < 0.7
    y, bias = row(torch.randn(2, 8))
    assert y.shape == (2, 4) and bias is None
