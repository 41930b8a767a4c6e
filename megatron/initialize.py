"""Process start-up: torch.distributed from torchrun or SLURM variables, parallel groups, seeds."""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

from megatron.parallel.random import model_parallel_seed
from megatron.parallel.state import ParallelState, initialize_model_parallel, single_process_state


def _rank_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else SLURM's, else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        os.environ.setdefault("MASTER_PORT", "6000")
        if "MASTER_ADDR" not in os.environ:
            raise SystemExit(
                "error: under SLURM set MASTER_ADDR to the first node's hostname "
                "(see scripts/slurm_gpt.sbatch: export MASTER_ADDR=$(scontrol show hostnames | head -n 1))"
            )
        return rank, world, int(os.environ.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def initialize_megatron(args: argparse.Namespace) -> ParallelState:
    """Join the process group (if more than one process), build the TP/DP groups and seed every RNG.

    A single process without launcher variables runs without torch.distributed at all.
    """
    rank, world_size, local_rank = _rank_env()
    if world_size != args.world_size:
        raise SystemExit(f"error: launcher world size {world_size} differs from the parsed {args.world_size}")
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if world_size > 1 or dist.is_initialized():
        if not dist.is_initialized():
            backend = args.distributed_backend or ("nccl" if torch.cuda.is_available() else "gloo")
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes),
            )
        parallel = initialize_model_parallel(
            args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        )
    else:
        parallel = single_process_state()
    args.rank = rank
    model_parallel_seed(args.seed, parallel)
    return parallel
