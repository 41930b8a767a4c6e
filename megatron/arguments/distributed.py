"""Flags of the TP x PP x DP grid and the launcher's environment (torchrun or SLURM)."""

from __future__ import annotations

import argparse
import os
from typing import Callable, NoReturn

import torch

from megatron.parallel import pipeline_layout


def launcher_ranks() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM (SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID) announce them; (0, 1, 0) for a process started on its own."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def world_size_from_env() -> int:
    return launcher_ranks()[1]


def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="Tensor model parallel degree.")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="Pipeline stages.")
    g.add_argument(
        "--virtual-pipeline-model-parallel-size", type=int, default=None,
        help="Model chunks per pipeline stage (interleaved 1F1B).",
    )  # fmt: skip
    g.add_argument(
        "--num-layers-per-virtual-pipeline-stage", type=int, default=None,
        help="Layers per virtual stage (the classic way to ask for interleaving).",
    )  # fmt: skip
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None, help="Layers of stage 0.")
    g.add_argument(
        "--decoder-last-pipeline-num-layers", type=int, default=None, help="Layers of the last stage."
    )
    g.add_argument(
        "--distributed-backend",
        choices=["nccl", "gloo"],
        default=None,
        help="Default: nccl with CUDA, gloo otherwise.",
    )
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)
    g.add_argument("--local-rank", type=int, default=None, help="Set by the launcher.")
    g.add_argument(
        "--no-overlap-grad-reduce",
        action="store_false",
        dest="overlap_grad_reduce",
        help="All-reduce gradients after the backward pass instead of overlapping with it.",
    )
    g.add_argument("--ddp-bucket-size", type=int, default=40_000_000, help="Elements per gradient bucket.")
    g.add_argument(
        "--sequence-parallel",
        action="store_true",
        help="With tensor parallelism: layernorm, dropout and residual on s/t of the sequence each.",
    )
    g.add_argument(
        "--use-distributed-optimizer",
        action="store_true",
        help="ZeRO-1: shard the fp32 main weights and Adam state over the data-parallel group.",
    )
    g.add_argument(
        "--overlap-param-gather",
        action="store_true",
        help="Overlap the distributed optimizer's parameter all-gather with the next forward pass.",
    )


def check_pipeline_args(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> None:
    """The split of --num-layers over the stages (and virtual stages) and the microbatches it needs."""
    try:
        pipeline_layout.check_pipeline_args(
            args, args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
        )
    except ValueError as e:
        fail(str(e))


def check_distributed_args(args: argparse.Namespace, fail: Callable[[str], NoReturn]) -> None:
    """The TP x PP x DP grid of the world size, and the backend; fills data_parallel_size."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1:
        fail(f"--tensor-model-parallel-size must be >= 1, got {tp}")
    if pp < 1:
        fail(f"--pipeline-model-parallel-size must be >= 1, got {pp}")
    if tp > args.world_size:
        fail(f"--tensor-model-parallel-size {tp} is larger than the world size {args.world_size}")
    if args.world_size % (tp * pp) != 0:
        fail(
            f"world size {args.world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}"
        )
    args.data_parallel_size = args.world_size // (tp * pp)
    if args.distributed_backend == "nccl" and args.world_size > 1 and not torch.cuda.is_available():
        fail(
            "--distributed-backend nccl needs CUDA GPUs, and none is visible: use --distributed-backend gloo"
        )
    if args.use_distributed_optimizer and args.optimizer != "adam":
        fail(
            f"--use-distributed-optimizer shards Adam's state only: --optimizer {args.optimizer} cannot be sharded"
        )
    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        fail(
            "--overlap-param-gather needs --use-distributed-optimizer (and the default --overlap-grad-reduce)"
        )
