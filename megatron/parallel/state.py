"""Process groups of the parallel grid: tensor-parallel (TP), pipeline-parallel (PP) and data-parallel (DP).

The world of W = TP x PP x DP ranks is ordered as in Megatron-LM: the TP index varies fastest, then the
DP index, then the PP index (the stage):

    global_rank = tp_rank + tp_size * (dp_rank + dp_size * pp_rank)

so the ranks of one TP group are adjacent (TP traffic stays inside a node), the ranks of one DP group
are strided by `tp_size` inside one stage, and the ranks of one pipeline are strided by W / PP: pipeline
i is the ranks i, i + W/PP, i + 2 W/PP, ... For TP 2 x PP 2 x DP 2 on 8 ranks:

    TP groups: [0, 1] [2, 3] [4, 5] [6, 7]        DP groups: [0, 2] [1, 3] [4, 6] [5, 7]
    pipelines: [0, 4] [1, 5] [2, 6] [3, 7]        model-parallel (TP x PP) groups: [0, 1, 4, 5] [2, 3, 6, 7]
    embedding groups (first and last stage of each pipeline): [0, 4] [1, 5] [2, 6] [3, 7]

The embedding group all-reduces the gradients of the two copies of the tied word embedding (first stage:
input embedding; last stage: output layer). The position-embedding group is the first stage of each
pipeline alone (Megatron's, without an encoder-decoder split), so it never communicates.

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
    `pipeline_ranks` are the global ranks of this rank's pipeline, stage 0 first (the p2p peers).
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
    pp_rank: int = 0
    pp_group: Optional[dist.ProcessGroup] = None
    mp_group: Optional[dist.ProcessGroup] = None  # TP x PP: every rank holding a part of one model replica
    embedding_group: Optional[dist.ProcessGroup] = None  # first + last stage, on those ranks only
    pipeline_ranks: tuple[int, ...] = (0,)

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

    @property
    def is_last_rank(self) -> bool:
        """True on the last global rank: a last pipeline stage, where losses are known (Megatron's print_rank_last)."""
        return self.global_rank == self.world_size - 1

    @property
    def is_pp_first(self) -> bool:
        """True on the first pipeline stage (it holds the input embedding)."""
        return self.pp_rank == 0

    @property
    def is_pp_last(self) -> bool:
        """True on the last pipeline stage (it holds the final layernorm, output layer and the loss)."""
        return self.pp_rank == self.pp_size - 1

    @property
    def next_rank(self) -> int:
        """Global rank of the next stage of this pipeline (wrapping around: the last stage's next is the first)."""
        return self.pipeline_ranks[(self.pp_rank + 1) % self.pp_size]

    @property
    def prev_rank(self) -> int:
        """Global rank of the previous stage of this pipeline (wrapping around)."""
        return self.pipeline_ranks[(self.pp_rank - 1) % self.pp_size]


def single_process_state() -> ParallelState:
    """The trivial grid tp = pp = dp = 1; needs no torch.distributed."""
    return ParallelState(tp_group=None, dp_group=None, tp_rank=0, tp_size=1, dp_rank=0, dp_size=1)


def grid_coordinates(rank: int, world_size: int, tp_size: int, pp_size: int) -> tuple[int, int, int]:
    """(tp_rank, dp_rank, pp_rank) of global `rank`: the inverse of tp + tp_size * (dp + dp_size * pp)."""
    dp_size = world_size // (tp_size * pp_size)
    return rank % tp_size, (rank // tp_size) % dp_size, rank // (tp_size * dp_size)


def tensor_parallel_groups(world_size: int, tp_size: int, pp_size: int = 1) -> list[list[int]]:
    """Global ranks of each TP group: consecutive blocks of `tp_size` ranks."""
    return [list(range(start, start + tp_size)) for start in range(0, world_size, tp_size)]


def data_parallel_groups(world_size: int, tp_size: int, pp_size: int = 1) -> list[list[int]]:
    """Global ranks of each DP group: within one stage's block of W / PP ranks, those with the same tp_rank."""
    stage_size = world_size // pp_size
    return [
        list(range(stage * stage_size + tp_rank, (stage + 1) * stage_size, tp_size))
        for stage in range(pp_size)
        for tp_rank in range(tp_size)
    ]


def pipeline_parallel_groups(world_size: int, pp_size: int) -> list[list[int]]:
    """Global ranks of each pipeline, stage 0 first: i, i + W/PP, ..., for i < W/PP."""
    stage_size = world_size // pp_size
    return [list(range(i, world_size, stage_size)) for i in range(stage_size)]


def model_parallel_groups(world_size: int, tp_size: int, pp_size: int) -> list[list[int]]:
    """Global ranks holding one whole model replica (TP x PP), one group per DP index, sorted."""
    stage_size = world_size // pp_size
    return [
        sorted(stage * stage_size + dp * tp_size + t for stage in range(pp_size) for t in range(tp_size))
        for dp in range(stage_size // tp_size)
    ]


def embedding_groups(world_size: int, pp_size: int) -> list[list[int]]:
    """First and last stage of each pipeline (the first alone when pp_size is 1)."""
    return [sorted({p[0], p[-1]}) for p in pipeline_parallel_groups(world_size, pp_size)]


def position_embedding_groups(world_size: int, pp_size: int) -> list[list[int]]:
    """The first stage of each pipeline: a group of one rank, so no process group is ever created for it
    (Megatron's position-embedding group only grows with an encoder-decoder split, which we do not have)."""
    return [p[:1] for p in pipeline_parallel_groups(world_size, pp_size)]


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


def _new_groups(all_groups: list[list[int]], rank: int) -> Optional[dist.ProcessGroup]:
    """Create every group (all ranks must call new_group for all groups, in the same order); return ours,
    or None when our group holds this rank alone."""
    if all(len(ranks) == 1 for ranks in all_groups):
        return None
    mine = None
    for ranks in all_groups:
        group = dist.new_group(ranks)
        if rank in ranks and len(ranks) > 1:
            mine = group
    return mine


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1
) -> ParallelState:
    """Build the TP, DP, PP, model-parallel and embedding groups of the grid on an initialised world.

    Must be called by every rank, with the same arguments. Without torch.distributed initialised the
    world is a single process and the sizes must be 1. Raises ValueError when the world size is not
    divisible by tp * pp.
    """
    tp_size, pp_size = tensor_model_parallel_size, pipeline_model_parallel_size
    if not dist.is_initialized():
        _check_grid(1, tp_size, pp_size)
        return single_process_state()
    world_size, rank = dist.get_world_size(), dist.get_rank()
    _check_grid(world_size, tp_size, pp_size)
    dp_size = world_size // (tp_size * pp_size)
    tp_rank, dp_rank, pp_rank = grid_coordinates(rank, world_size, tp_size, pp_size)
    pipeline = next(p for p in pipeline_parallel_groups(world_size, pp_size) if rank in p)
    return ParallelState(
        tp_group=_new_groups(tensor_parallel_groups(world_size, tp_size), rank),
        dp_group=_new_groups(data_parallel_groups(world_size, tp_size, pp_size), rank),
        tp_rank=tp_rank,
        tp_size=tp_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        pp_size=pp_size,
        tp_src_rank=rank - tp_rank,
        global_rank=rank,
        pp_rank=pp_rank,
        pp_group=_new_groups(pipeline_parallel_groups(world_size, pp_size), rank),
        mp_group=_new_groups(model_parallel_groups(world_size, tp_size, pp_size), rank),
        embedding_group=_new_groups(embedding_groups(world_size, pp_size), rank),
        pipeline_ranks=tuple(pipeline),
    )


def describe_grid(parallel: ParallelState) -> str:
    """The start-up line naming the grid: 'tensor-parallel 2 x pipeline-parallel 2 x data-parallel 2'."""
    return (
        f"tensor-parallel {parallel.tp_size} x pipeline-parallel {parallel.pp_size} x "
        f"data-parallel {parallel.dp_size}"
    )


def print_rank_0(parallel: ParallelState, message: str) -> None:
    """Print on global rank 0 only (Megatron's print_rank_0), so a log line appears once per job."""
    if parallel.is_first_rank:
        print(message, flush=True)


def print_rank_last(parallel: ParallelState, message: str) -> None:
    """Print on the last global rank only (Megatron's print_rank_last): a last pipeline stage knows the loss."""
    if parallel.is_last_rank:
        print(message, flush=True)
