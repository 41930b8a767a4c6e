"""Training-side glue for pipeline parallelism: build this rank's model chunk(s) and run one global batch
through the schedule of the grid (megatron.schedules), with gradients finalised for the optimizer.

A model provider takes `(args, parallel, ...)` and, under pipeline parallelism, a keyword `stage`
(megatron.parallel.pipeline_layout.StageLayout) naming the layers to build. This rank holds one chunk
(`--virtual-pipeline-model-parallel-size` unset) or v chunks in an nn.ModuleList (interleaved 1F1B);
either is wrapped whole in one DistributedDataParallel, so one gradient buffer covers all chunks.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch
from torch import nn

from megatron.parallel.pipeline_layout import stage_layouts, virtual_pipeline_size
from megatron.parallel.state import ParallelState
from megatron.schedules import LoggedStats, ScheduleConfig, get_forward_backward_func

ModelProvider = Callable[..., nn.Module]


class PipelineSetupError(Exception):
    """The model cannot be split as the flags ask; the message names the flag."""


def build_model(
    model_provider: ModelProvider, args: argparse.Namespace, parallel: ParallelState, *provider_args: Any
) -> nn.Module:
    """The whole model (PP = 1), this stage's chunk, or an nn.ModuleList of this stage's v chunks:
    model_provider(args, parallel, *provider_args[, stage=...])."""
    if parallel.pp_size == 1:
        return model_provider(args, parallel, *provider_args)
    layouts = stage_layouts(
        args.num_layers,
        parallel.pp_size,
        virtual_pipeline_size(args),
        args.decoder_first_pipeline_num_layers,
        args.decoder_last_pipeline_num_layers,
    )[parallel.pp_rank]
    if "stage" not in inspect.signature(model_provider).parameters:
        raise PipelineSetupError(
            "--pipeline-model-parallel-size > 1: this model provider cannot build a pipeline stage; run with "
            "--pipeline-model-parallel-size 1"
        )
    chunks = [model_provider(args, parallel, *provider_args, stage=stage) for stage in layouts]
    return chunks[0] if len(chunks) == 1 else nn.ModuleList(chunks)


def model_chunks(module: nn.Module) -> list[nn.Module]:
    """The chunks of a module built by `build_model` (a ModuleList of chunks, or one model)."""
    return list(module) if isinstance(module, nn.ModuleList) else [module]


def schedule_config(
    args: argparse.Namespace,
    parallel: ParallelState,
    num_microbatches: int,
    forward_only: bool,
    micro_batch_sequences: Optional[int] = None,
    **hooks: Callable,
) -> ScheduleConfig:
    """Sizes of one global batch. Under pipelining the activations passed between stages are [micro batch,
    sequence, hidden] in the parameter dtype (fp32 with --fp32-residual-connection); with
    --sequence-parallel each TP rank sends and receives its s/t positions, [micro batch, sequence / t, hidden].
    The micro batch is --micro-batch-size sequences unless `micro_batch_sequences` says otherwise (a
    multiple-choice sample is one sequence per choice; an evaluation batch may be shorter)."""
    if parallel.pp_size == 1:
        return ScheduleConfig(num_microbatches, forward_only=forward_only, **hooks)
    dtype = torch.float32 if args.fp32_residual_connection else args.params_dtype
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    seq = args.seq_length // parallel.tp_size if args.sequence_parallel else args.seq_length
    shape = (micro_batch_sequences or args.micro_batch_size, seq, args.hidden_size)
    return ScheduleConfig(num_microbatches, shape, dtype, forward_only, device=device, **hooks)


def forward_backward(
    forward_step: Callable,
    data_iterator: Iterator,
    model: nn.Module,
    num_microbatches: int,
    args: argparse.Namespace,
    parallel: ParallelState,
    scale_loss: Callable,
    micro_batch_sequences: Optional[int] = None,
) -> LoggedStats:
    """Forward and backward of one global batch through the schedule, then the data-parallel gradient
    reduction and the tied-embedding all-reduce (both in finish_grad_sync): main_grad is ready for the optimizer. `model` is the
    DistributedDataParallel wrapper. Returns the logged values of each microbatch (last stage only).
    `micro_batch_sequences`: see `schedule_config`."""
    chunks = model_chunks(model.module)
    hooks = {"scale_loss": scale_loss, "no_sync": model.no_sync}
    config = schedule_config(args, parallel, num_microbatches, False, micro_batch_sequences, **hooks)
    schedule = get_forward_backward_func(parallel, len(chunks))
    stats = schedule(
        lambda it, m: forward_step(it, m, args, parallel), data_iterator, chunks, config, parallel
    )
    model.finish_grad_sync()  # also sums the tied embedding's copies over the embedding group
    return stats


def forward_only(
    forward_step: Callable,
    data_iterator: Iterator,
    model: nn.Module,
    num_microbatches: int,
    args: argparse.Namespace,
    parallel: ParallelState,
    micro_batch_sequences: Optional[int] = None,
) -> LoggedStats:
    """Forward of one global batch through the schedule (evaluation); logged values on the last stage.
    `micro_batch_sequences`: see `schedule_config`."""
    module = model.module if hasattr(model, "module") else model
    chunks = model_chunks(module)
    config = schedule_config(args, parallel, num_microbatches, True, micro_batch_sequences)
    schedule = get_forward_backward_func(parallel, len(chunks))
    return schedule(
        lambda it, m: forward_step(it, m, args, parallel), data_iterator, chunks, config, parallel
    )
