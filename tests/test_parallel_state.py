"""Process-group layout of megatron.parallel.state: TP ranks adjacent, DP ranks strided, clear errors."""

import copy

import pytest
import torch
import torch.distributed as dist

from megatron.parallel.state import (
    ParallelState,
    data_parallel_groups,
    describe_grid,
    embedding_groups,
    initialize_model_parallel,
    model_parallel_groups,
    pipeline_parallel_groups,
    position_embedding_groups,
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
    for tp, pp in [(1, 2), (2, 2), (1, 4)]:
        _check_3d_grid(rank, world_size, tp, pp)
    with pytest.raises(
        ValueError, match=r"world size \(4\) is not divisible by tensor_model_parallel_size \(3\)"
    ):
        initialize_model_parallel(3)
    with pytest.raises(ValueError, match=r"world size \(4\) is not divisible by .* \(2\) x .* \(3\)"):
        initialize_model_parallel(2, 3)


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


def _enumerate_grid(tp: int, pp: int, dp: int) -> dict[int, tuple[int, int, int]]:
    """Megatron's order written out as nested loops: PP outermost, then DP, then TP (fastest)."""
    coords, rank = {}, 0
    for p in range(pp):
        for d in range(dp):
            for t in range(tp):
                coords[rank] = (t, d, p)
                rank += 1
    return coords


def _expected_groups(tp: int, pp: int, dp: int) -> dict[str, list[list[int]]]:
    """Every group of the grid from the enumeration: ranks agreeing on the other coordinates."""
    coords = _enumerate_grid(tp, pp, dp)

    def group_by(key) -> list[list[int]]:
        groups: dict = {}
        for rank in sorted(coords):
            groups.setdefault(key(*coords[rank]), []).append(rank)
        return sorted(groups.values())

    pipelines = group_by(lambda t, d, p: (t, d))
    return {
        "tp": group_by(lambda t, d, p: (d, p)),
        "dp": group_by(lambda t, d, p: (t, p)),
        "pp": pipelines,
        "mp": group_by(lambda t, d, p: d),
        "embedding": sorted(sorted({g[0], g[-1]}) for g in pipelines),
        "position": sorted([g[0]] for g in pipelines),
    }


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 4), (2, 2, 2), (1, 4, 2), (2, 4, 1), (4, 2, 1), (1, 2, 3)])
def test_group_lists_match_an_independent_enumeration(tp, pp, dp):
    world = tp * pp * dp
    expected = _expected_groups(tp, pp, dp)
    assert sorted(tensor_parallel_groups(world, tp)) == expected["tp"]
    assert sorted(data_parallel_groups(world, tp, pp)) == expected["dp"]
    assert sorted(pipeline_parallel_groups(world, pp)) == expected["pp"]
    assert sorted(model_parallel_groups(world, tp, pp)) == expected["mp"]
    assert sorted(embedding_groups(world, pp)) == expected["embedding"]
    assert sorted(position_embedding_groups(world, pp)) == expected["position"]


def test_design_example_8_ranks():
    """The TP 2 x PP 2 x DP 2 example of DESIGN.md, written out."""
    assert tensor_parallel_groups(8, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert data_parallel_groups(8, 2, 2) == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert pipeline_parallel_groups(8, 2) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert embedding_groups(8, 2) == [[0, 4], [1, 5], [2, 6], [3, 7]]


def _check_3d_grid(rank: int, world_size: int, tp: int, pp: int) -> None:
    state = initialize_model_parallel(tp, pp)
    dp = world_size // (tp * pp)
    t, d, p = _enumerate_grid(tp, pp, dp)[rank]
    assert (state.tp_rank, state.dp_rank, state.pp_rank) == (t, d, p)
    assert (state.tp_size, state.pp_size, state.dp_size) == (tp, pp, dp)
    assert state.is_pp_first == (p == 0) and state.is_pp_last == (p == pp - 1)
    assert state.is_last_rank == (rank == world_size - 1)
    expected = _expected_groups(tp, pp, dp)
    for name, group in [
        ("tp", state.tp_group),
        ("dp", state.dp_group),
        ("pp", state.pp_group),
        ("mp", state.mp_group),
    ]:
        mine = next(g for g in expected[name] if rank in g)
        assert (group is None) == (len(mine) == 1), name
        assert _members(group) == mine, name
    pipeline = next(g for g in expected["pp"] if rank in g)
    assert list(state.pipeline_ranks) == pipeline
    assert state.next_rank == pipeline[(p + 1) % pp] and state.prev_rank == pipeline[(p - 1) % pp]
    embedding = next(g for g in expected["embedding"] if rank in g) if p in (0, pp - 1) else None
    if embedding is None or len(embedding) == 1:
        assert state.embedding_group is None
    else:
        assert _members(state.embedding_group) == embedding
    assert describe_grid(state) == f"tensor-parallel {tp} x pipeline-parallel {pp} x data-parallel {dp}"


def _3d_grids(rank: int, world_size: int) -> None:
    for tp, pp in [(2, 2), (1, 4)]:
        _check_3d_grid(rank, world_size, tp, pp)


@pytest.mark.slow
def test_3d_group_layout_world8():
    run_distributed(_3d_grids, world_size=8)
