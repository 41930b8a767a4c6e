"""Process-group layout of megatron.parallel.state: TP ranks adjacent, DP ranks strided, clear errors."""

import copy

import pytest
import torch
import torch.distributed as dist

from megatron.parallel.state import (
    ParallelState,
    data_parallel_groups,
    initialize_model_parallel,
    single_process_state,
    tensor_parallel_groups,
)
from tests.distributed_utils import run_distributed


def _members(group) -> list[int]:
    """Global ranks of `group` in group-rank order, found by all-gathering each member's global rank."""
    if group is None:  # a group of one: this rank alone
        return [dist.get_rank()]
    size = dist.get_world_size(group)
    parts = [torch.zeros(1, dtype=torch.long) for _ in range(size)]
    dist.all_gather(parts, torch.tensor([dist.get_rank()]), group=group)
    return [int(p) for p in parts]


def _check_grid(rank: int, world_size: int, tp: int) -> None:
    state = initialize_model_parallel(tp)
    dp = world_size // tp
    assert (state.tp_size, state.dp_size, state.pp_size) == (tp, dp, 1)
    assert state.world_size == world_size and state.global_rank == rank
    assert state.tp_rank == rank % tp and state.dp_rank == rank // tp
    assert state.tp_src_rank == rank - rank % tp
    assert state.is_tp_first == (rank % tp == 0) and state.is_first_rank == (rank == 0)
    assert (state.tp_group is None) == (tp == 1) and (state.dp_group is None) == (dp == 1)
    assert _members(state.tp_group) == list(range(rank - rank % tp, rank - rank % tp + tp))
    assert _members(state.dp_group) == list(range(rank % tp, world_size, tp))


def _grids_and_errors(rank: int, world_size: int) -> None:
    for tp in (1, 2, 4):
        if world_size % tp == 0:
            _check_grid(rank, world_size, tp)
    with pytest.raises(
        ValueError, match=r"world size \(4\) is not divisible by tensor_model_parallel_size \(3\)"
    ):
        initialize_model_parallel(3)
    with pytest.raises(NotImplementedError, match="pipeline_model_parallel_size = 2"):
        initialize_model_parallel(2, 2)


def test_group_layout_world4():
    run_distributed(_grids_and_errors, world_size=4)


def test_group_lists():
    assert tensor_parallel_groups(4, 2) == [[0, 1], [2, 3]]
    assert data_parallel_groups(4, 2) == [[0, 2], [1, 3]]
    assert tensor_parallel_groups(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert data_parallel_groups(8, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert data_parallel_groups(4, 4) == [[0], [1], [2], [3]]


def test_single_process():
    state = single_process_state()
    assert state == initialize_model_parallel(1)  # torch.distributed is not initialised in the test process
    assert (state.tp_size, state.dp_size, state.world_size, state.tp_rank, state.dp_rank) == (1, 1, 1, 0, 0)
    assert state.tp_group is None and state.dp_group is None and state.is_tp_first
    with pytest.raises(
        ValueError, match=r"world size \(1\) is not divisible by tensor_model_parallel_size \(2\)"
    ):
        initialize_model_parallel(2)
    with pytest.raises(ValueError, match="must be >= 1"):
        initialize_model_parallel(0)


def test_state_is_frozen_and_deepcopy_shares_it():
    state = ParallelState(tp_group=None, dp_group=None, tp_rank=1, tp_size=2, dp_rank=0, dp_size=1)
    with pytest.raises(AttributeError):
        state.tp_rank = 0
    assert copy.deepcopy(state) is state
    assert not state.is_tp_first and state.world_size == 2
