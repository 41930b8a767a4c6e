"""Process groups of the parallel grid: who shares a tensor-parallel (TP) group and who a data-parallel (DP) group.

The world of `W` ranks is laid out as TP x PP x DP with the TP index varying fastest, as in Megatron-LM:

    global_rank = tp_rank + tp_size * (pp_rank + pp_size * dp_rank)

so the ranks of one TP group are adjacent (ranks 0..tp-1 form the first one; TP traffic stays inside a
node) and the ranks of one DP group are strided by `tp_size * pp_size`. For W = 4, tp = 2:

    TP groups: [0, 1], [2, 3]        DP groups: [0, 2], [1, 3]

There is no module-level group state: `initialize_model_parallel` returns a frozen `ParallelState` that
the caller passes explicitly to every layer and function that communicates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    """This rank's place in the TP x PP x DP grid and the process groups it belongs to.

    A group is None when it would contain this rank alone (size 1) or when torch.distributed is not
    initialised; the communication functions treat a None group as "no communication needed".
    """

    tp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]
    tp_rank: int
    tp_size: int
    dp_rank: int
    dp_size: int
    pp_size: int = 1
    tp_src_rank: int = 0  # global rank of tp_rank 0 in this rank's TP group (the broadcast source)
    global_rank: int = 0

    def __deepcopy__(self, memo: dict) -> ParallelState:
        """Process groups are shared handles, not data: a deep copy of a model keeps the same state."""
        return self

    @property
    def world_size(self) -> int:
        """Total number of ranks: tp_size * pp_size * dp_size."""
        return self.tp_size * self.pp_size * self.dp_size

    @property
    def is_tp_first(self) -> bool:
        """True on the first rank of the TP group (the one that reads data and broadcasts it)."""
        return self.tp_rank == 0

    @property
    def is_first_rank(self) -> bool:
        """True on global rank 0 (the one that logs and writes shared files)."""
        return self.global_rank == 0


def single_process_state() -> ParallelState:
    """The trivial grid tp = pp = dp = 1; needs no torch.distributed."""
    return ParallelState(tp_group=None, dp_group=None, tp_rank=0, tp_size=1, dp_rank=0, dp_size=1)


def tensor_parallel_groups(world_size: int, tp_size: int) -> list[list[int]]:
    """Global ranks of each TP group for pp = 1: consecutive blocks of `tp_size` ranks."""
    return [list(range(start, start + tp_size)) for start in range(0, world_size, tp_size)]


def data_parallel_groups(world_size: int, tp_size: int) -> list[list[int]]:
    """Global ranks of each DP group for pp = 1: ranks with the same tp_rank, i.e. strided by `tp_size`."""
    return [list(range(tp_rank, world_size, tp_size)) for tp_rank in range(tp_size)]


def _check_grid(world_size: int, tp_size: int, pp_size: int) -> None:
    if tp_size < 1 or pp_size < 1:
        raise ValueError(
            f"tensor_model_parallel_size ({tp_size}) and pipeline_model_parallel_size ({pp_size}) must be >= 1"
        )
    if world_size % (tp_size * pp_size) != 0:
        raise ValueError(
            f"world size ({world_size}) is not divisible by tensor_model_parallel_size ({tp_size}) x "
            f"pipeline_model_parallel_size ({pp_size}) = {tp_size * pp_size}"
        )
    if pp_size != 1:
        raise NotImplementedError(
            f"pipeline_model_parallel_size = {pp_size}: pipeline parallelism is not implemented; use 1"
        )


def _new_groups(all_groups: list[list[int]], rank: int) -> Optional[dist.ProcessGroup]:
    """Create every group (all ranks must call new_group for all groups, in the same order); return ours."""
    mine = None
    for ranks in all_groups:
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1
) -> ParallelState:
    """Build the TP and DP groups of the grid on an initialised torch.distributed world.

    Must be called by every rank, with the same arguments. Without torch.distributed initialised the
    world is a single process and the sizes must be 1. Raises ValueError when the world size is not
    divisible by tp * pp and NotImplementedError for pp > 1.
    """
    tp_size, pp_size = tensor_model_parallel_size, pipeline_model_parallel_size
    if not dist.is_initialized():
        _check_grid(1, tp_size, pp_size)
        return single_process_state()
    world_size, rank = dist.get_world_size(), dist.get_rank()
    _check_grid(world_size, tp_size, pp_size)
    dp_size = world_size // tp_size
    tp_group = _new_groups(tensor_parallel_groups(world_size, tp_size), rank) if tp_size > 1 else None
    dp_group = _new_groups(data_parallel_groups(world_size, tp_size), rank) if dp_size > 1 else None
    return ParallelState(
        tp_group=tp_group,
        dp_group=dp_group,
        tp_rank=rank % tp_size,
        tp_size=tp_size,
        dp_rank=rank // tp_size,
        dp_size=dp_size,
        pp_size=pp_size,
        tp_src_rank=rank - rank % tp_size,
        global_rank=rank,
    )


def print_rank_0(parallel: ParallelState, message: str) -> None:
    """Print on global rank 0 only (Megatron's print_rank_0), so a log line appears once per job."""
    if parallel.is_first_rank:
        print(message, flush=True)
