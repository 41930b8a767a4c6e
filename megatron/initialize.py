"""Process start-up: torch.distributed from torchrun or SLURM variables, parallel groups, seeds."""

from __future__ import annotations

import argparse
import atexit
import datetime
import os

import torch
import torch.distributed as dist

from megatron.arguments import launcher_ranks
from megatron.parallel.random import model_parallel_seed
from megatron.parallel.state import ParallelState, initialize_model_parallel, single_process_state


def initialize_megatron(args: argparse.Namespace) -> ParallelState:
    """Join the process group (if more than one process), build the TP/DP groups and seed every RNG.

    A single process without launcher variables runs without torch.distributed at all.
    """
    rank, world_size, local_rank = launcher_ranks()
    if "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        os.environ.setdefault("MASTER_PORT", "6000")
        if "MASTER_ADDR" not in os.environ:
            raise SystemExit(
                "error: under SLURM set MASTER_ADDR to the first node's hostname (see scripts/launch/slurm.sbatch: "
                'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1))'
            )
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
            atexit.register(_leave_process_group)
        parallel = initialize_model_parallel(
            args.tensor_model_parallel_size, args.pipeline_model_parallel_size
        )
    else:
        parallel = single_process_state()
    model_parallel_seed(args.seed, parallel)
    return parallel


def _leave_process_group() -> None:
    """At exit, wait for the other ranks (gloo: monitored_barrier, at most 60 s) and destroy the process group
    while the interpreter is still whole. A rank whose peers have already closed their connections, or that is
    torn down with the group alive, can otherwise abort in gloo's threads ("terminate called without an active
    exception") after a successful run. When a peer never arrives (it failed), the group is left to the
    launcher."""
    if not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    except RuntimeError:
        return
    dist.destroy_process_group()
