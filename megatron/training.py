"""pretrain(): parse arguments, build model/optimizer/data, train with evaluation, logging and checkpoints.

One iteration (`train_step`), through the pipeline schedule of the grid (megatron.schedules):

    for each of the n microbatches (all but the last backward under model.no_sync()):
        loss_i = mean over the loss mask of the per-token loss         (on the last pipeline stage)
        backward(loss_scale * loss_i / n)            # fp32 gradient accumulation in param.main_grad
    all-reduce gradients over the data-parallel group (bucketed, overlapped with the last backward),
    then the tied word embedding's over the embedding group (first and last stage)
    losses from the last stage to every stage of the pipeline (all log and check the same numbers)
    optimizer step (unscale, skip on inf/nan, clip by the global norm, update fp32 main weights)
    learning-rate scheduler advances by the global batch size (in samples)

Entry scripts (pretrain_gpt.py, pretrain_bert.py) supply three functions:

    train_valid_test_datasets_provider(num_samples: [train, valid, test], args) -> (train, valid, test)
    model_provider(args, parallel, run[, stage=StageLayout]) -> nn.Module   (stage: a pipeline stage's layers)
    forward_step(data_iterator, model, args, parallel, *, run) -> (output, loss_func)
        where loss_func(output) -> (loss: scalar tensor, {name: scalar tensor} to log)

`args` holds the flags and is never written to; `run` (megatron.run_state.RunState) holds what the run
derives (padded vocabulary size, end-of-document id) and counts (iteration, consumed samples).

A relaunch whose checkpoint is already at --train-iters (or past --train-samples) prints "training is
complete at iteration N" and exits without training, evaluating or saving; with --skip-train it runs
the final evaluation.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron.arguments import ExtraArgsProvider, parse_args
from megatron.arguments.llama import flops_shape
from megatron.checkpointing import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from megatron.data.samplers import build_data_loader
from megatron.distributed import DistributedDataParallel
from megatron.initialize import initialize_megatron
from megatron.lr_scheduler import OptimizerParamScheduler
from megatron.microbatches import MicroBatchCalculator
from megatron.model.utils import hardware_flops
from megatron.optimizer import MegatronOptimizer, OptimizerConfig, build_optimizer
from megatron.parallel.collectives import all_reduce, any_rank
from megatron.parallel.state import ParallelState, describe_grid, print_rank_0, print_rank_last
from megatron.pipeline import PipelineSetupError, build_model, forward_backward, forward_only
from megatron.run_state import RunState
from megatron.schedules import broadcast_from_last_stage
from megatron.tokenizer import build_tokenizer
from megatron.training_log import IntervalLogger, ScalarWriter, StepStats, StepTimers, format_eval_block

DatasetsProvider = Callable[[list, argparse.Namespace], tuple]
ModelProvider = Callable[[argparse.Namespace, ParallelState, RunState], nn.Module]
# An entry script's forward step; pretrain() binds its `run` keyword and hands on a ForwardStep.
EntryForwardStep = Callable[..., tuple]
ForwardStep = Callable[[Iterator, nn.Module, argparse.Namespace, ParallelState], tuple]


class TrainingError(Exception):
    """A run that cannot go on (e.g. NaN losses that do not stop); reported as a clean error."""


def is_last_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def optimizer_config_from_args(args: argparse.Namespace) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer=args.optimizer,
        lr=args.lr if args.lr is not None else 0.0,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        sgd_momentum=args.sgd_momentum,
        clip_grad=args.clip_grad,
        fp16=args.fp16,
        bf16=args.bf16,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis,
        use_distributed_optimizer=args.use_distributed_optimizer,
        log_num_zeros_in_grad=args.log_num_zeros_in_grad,
    )


def build_scheduler(
    optimizer: MegatronOptimizer, args: argparse.Namespace, train_iters: Optional[int] = None
) -> OptimizerParamScheduler:
    """Megatron counts scheduler steps in samples: iterations are converted with the global batch size.
    `train_iters`: the run's length when the caller derives it (fine-tuning: --epochs), else --train-iters."""
    train_iters = args.train_iters if train_iters is None else train_iters
    if train_iters is not None:
        decay_steps = (args.lr_decay_iters or train_iters) * args.global_batch_size
        wd_incr_steps = train_iters * args.global_batch_size
        warmup_steps = args.lr_warmup_iters * args.global_batch_size
    else:
        decay_steps = args.lr_decay_samples or args.train_samples or 1
        wd_incr_steps = args.train_samples or 1
        warmup_steps = args.lr_warmup_samples
    if args.lr_warmup_fraction is not None:
        warmup_steps = int(args.lr_warmup_fraction * decay_steps)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr or 0.0,
        min_lr=args.min_lr,
        lr_warmup_steps=warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.start_weight_decay,
        end_wd=args.end_weight_decay,
        wd_incr_steps=wd_incr_steps,
        wd_incr_style=args.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
    )


def train_schedule(args: argparse.Namespace) -> tuple[int, int]:
    """(iterations, samples) of the whole run. With --train-samples the iterations follow the batch-size
    rampup, and the last global batch may take the run a little past --train-samples."""
    if args.train_iters is not None:
        return args.train_iters, args.train_iters * args.global_batch_size
    calculator = MicroBatchCalculator(
        args.global_batch_size, args.micro_batch_size, args.data_parallel_size, args.rampup_batch_size
    )
    consumed, iterations = 0, 0
    while consumed < (args.train_samples or 0):
        calculator.update(consumed)
        consumed += calculator.current_global_batch_size
        iterations += 1
    return iterations, consumed


def train_valid_test_num_samples(args: argparse.Namespace) -> list[int]:
    """Samples each split must provide: training, every evaluation of the run, and the final test."""
    train_iters, train_samples = train_schedule(args)
    evaluations = train_iters // args.eval_interval + 1
    return [
        train_samples,
        evaluations * args.eval_iters * args.global_batch_size,
        args.eval_iters * args.global_batch_size,
    ]


def _data_iterator(loader, cyclic: bool) -> Optional[Iterator]:
    if loader is None:
        return None
    if cyclic:
        return iter(itertools.chain.from_iterable(itertools.repeat(loader)))
    return iter(loader)


def _average_over_dp(stats: list[dict[str, torch.Tensor]], parallel: ParallelState) -> dict[str, float]:
    """Mean of each logged quantity over microbatches and data-parallel ranks."""
    if not stats:
        return {}
    names = list(stats[0])
    values = torch.stack([torch.stack([s[n].detach().float() for s in stats]).mean() for n in names])
    all_reduce(values, parallel.dp_group)
    values /= parallel.dp_size
    return {n: float(v) for n, v in zip(names, values.tolist())}


def train_step(
    forward_step: ForwardStep,
    data_iterator: Iterator,
    model: DistributedDataParallel,
    optimizer: MegatronOptimizer,
    num_microbatches: int,
    args: argparse.Namespace,
    parallel: ParallelState,
    timers: Optional[StepTimers] = None,
    micro_batch_sequences: Optional[int] = None,
) -> tuple[dict[str, float], bool, Optional[float], float]:
    """Forward/backward over all microbatches, gradient sync, optimizer step (phases timed by `timers`).
    `micro_batch_sequences`: the sequences of one microbatch when not --micro-batch-size (RACE: x 4).

    Returns (losses averaged over microbatches and DP ranks, update_successful, grad norm, num zeros in
    grad (0 unless --log-num-zeros-in-grad)).
    """
    optimizer.zero_grad()
    with timers.phase("forward-backward") if timers else nullcontext():
        stats = forward_backward(
            forward_step, data_iterator, model, num_microbatches, args, parallel, optimizer.scale_loss,
            micro_batch_sequences,
        )  # fmt: skip
    with timers.phase("optimizer") if timers else nullcontext():
        update_successful, grad_norm, num_zeros = optimizer.step()
    losses = broadcast_from_last_stage(_average_over_dp(stats, parallel), parallel)
    return losses, update_successful, grad_norm, num_zeros


@torch.no_grad()
def evaluate(
    forward_step: ForwardStep,
    data_iterator: Iterator,
    model: nn.Module,
    num_microbatches: int,
    args: argparse.Namespace,
    parallel: ParallelState,
) -> dict[str, float]:
    """Average losses over --eval-iters iterations of the global batch, dropout off."""
    model.eval()
    stats = []
    for _ in range(args.eval_iters):
        stats += forward_only(forward_step, data_iterator, model, num_microbatches, args, parallel)
    model.train()
    return broadcast_from_last_stage(_average_over_dp(stats, parallel), parallel)


def evaluate_and_print(
    prefix: str,
    forward_step: ForwardStep,
    data_iterator: Optional[Iterator],
    model: nn.Module,
    num_microbatches: int,
    args: argparse.Namespace,
    parallel: ParallelState,
    writer: ScalarWriter,
    run: RunState,
) -> Optional[dict[str, float]]:
    """Evaluate, print Megatron's validation block and write the scalars; counts the validation samples."""
    if data_iterator is None or args.eval_iters == 0:
        return None
    losses = evaluate(forward_step, data_iterator, model, num_microbatches, args, parallel)
    run.consumed_valid_samples += args.eval_iters * args.global_batch_size
    print_rank_last(parallel, format_eval_block(prefix, losses))
    tag = prefix.split()[0]
    scalars = {f"{name} {tag}": v for name, v in losses.items()}
    scalars.update({f"{name} {tag} ppl": math.exp(min(20.0, v)) for name, v in losses.items()})
    writer.add_scalars(scalars, run.iteration)
    return losses


def setup_model_and_optimizer(
    model_provider: ModelProvider,
    args: argparse.Namespace,
    parallel: ParallelState,
    run: RunState,
    train_iters: Optional[int] = None,
) -> tuple[DistributedDataParallel, MegatronOptimizer, OptimizerParamScheduler]:
    """Build the model in fp32 (TP-independent initialisation), cast it to the training dtype, wrap it
    for data parallelism, and build the optimizer and its learning-rate scheduler (`train_iters`: see
    `build_scheduler`)."""
    model = build_model(model_provider, args, parallel, run)
    if args.params_dtype != torch.float32:
        model = model.to(dtype=args.params_dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    model = DistributedDataParallel(
        model,
        parallel,
        bucket_size=args.ddp_bucket_size,
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather,
    )
    optimizer = build_optimizer(model, optimizer_config_from_args(args), parallel)
    scheduler = build_scheduler(optimizer, args, train_iters)
    return model, optimizer, scheduler


def load_for_training(
    model: DistributedDataParallel,
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    args: argparse.Namespace,
    parallel: ParallelState,
    run: RunState,
) -> None:
    """Resume from --load into `run` (or start fresh when it holds no checkpoint)."""
    try:
        iteration, ckpt_args = load_checkpoint(
            model.module,
            optimizer,
            scheduler,
            args.load,
            parallel,
            no_load_optim=args.no_load_optim,
            no_load_rng=args.no_load_rng,
            finetune=args.finetune,
            run_args=run.checkpoint_args(args),
        )
    except ValueError as e:  # the scheduler refuses settings that contradict the checkpoint's
        raise CheckpointError(f"{args.load}: {e}") from None
    if ckpt_args is None:
        return
    release = read_metadata(args.load)[1]
    if args.finetune or args.no_load_optim or release:
        optimizer.reload_model_params()  # fp32 main weights from the loaded (bf16/fp16) model weights
    if not args.finetune:
        run.resume(iteration, ckpt_args)
    print_rank_0(parallel, f"> loaded checkpoint from {args.load} at iteration {iteration}")


def build_data_iterators(
    datasets: tuple, args: argparse.Namespace, parallel: ParallelState, run: RunState, train: bool
) -> tuple[Optional[Iterator], ...]:
    """Iterators over this data-parallel rank's micro batches; training resumes at the consumed samples
    (no training iterator unless `train`). Validation and test iterators cycle, so any number of
    evaluations can draw from them."""
    train_ds, valid_ds, test_ds = datasets
    loader = partial(
        build_data_loader,
        micro_batch_size=args.micro_batch_size,
        parallel_rank=parallel.dp_rank,
        parallel_size=parallel.dp_size,
        num_workers=args.num_workers,
    )
    train_iter = None
    if train:
        train_loader = loader(
            train_ds, run.consumed_train_samples, dataloader_type=args.dataloader_type, seed=args.seed
        )
        train_iter = _data_iterator(train_loader, args.dataloader_type == "cyclic")
    return (
        train_iter,
        _data_iterator(loader(valid_ds, run.consumed_valid_samples), True),
        _data_iterator(loader(test_ds, 0), True),
    )


def pretrain(
    train_valid_test_datasets_provider: DatasetsProvider,
    model_provider: ModelProvider,
    forward_step: EntryForwardStep,
    extra_args_provider: Optional[ExtraArgsProvider] = None,
    args_defaults: Optional[dict] = None,
    argv: Optional[list[str]] = None,
) -> dict:
    """Parse flags, then train. User errors exit cleanly with a message (no traceback).

    Returns a summary (iteration, last losses, validation/test losses) for scripts and tests.
    """
    args = parse_args(argv, extra_args_provider, args_defaults)
    try:
        return _pretrain(train_valid_test_datasets_provider, model_provider, forward_step, args)
    except (CheckpointError, TrainingError, PipelineSetupError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def training_is_complete(args: argparse.Namespace, run: RunState) -> bool:
    """True when the checkpoint the run resumed from is already at --train-iters (or past --train-samples)."""
    if args.train_iters is not None:
        return run.iteration >= args.train_iters
    return args.train_samples is not None and run.consumed_train_samples >= args.train_samples


def _pretrain(
    datasets_provider: DatasetsProvider,
    model_provider: ModelProvider,
    entry_forward_step: EntryForwardStep,
    args: argparse.Namespace,
) -> dict:
    start_time = time.time()
    parallel = initialize_megatron(args)
    tokenizer = build_tokenizer(args)
    run = RunState.from_tokenizer(tokenizer, args)
    print_rank_0(
        parallel,
        f"> world size {args.world_size}: {describe_grid(parallel)}; "
        f"vocab {tokenizer.vocab_size} padded to {run.padded_vocab_size}",
    )
    model, optimizer, scheduler = setup_model_and_optimizer(model_provider, args, parallel, run)
    if args.load:
        load_for_training(model, optimizer, scheduler, args, parallel, run)
    summary: dict = {"iteration": run.iteration, "losses": [], "skipped_iterations": 0}
    complete = training_is_complete(args, run)
    if complete:
        print_rank_0(parallel, f"training is complete at iteration {run.iteration}")
        if not args.skip_train:  # a relaunch of a finished run: nothing to train, evaluate or save
            return summary
    try:
        datasets = datasets_provider(train_valid_test_num_samples(args), args)
    except (ValueError, OSError) as e:  # the data modules name the flag or file at fault
        raise TrainingError(f"data: {e}") from None
    train = not (args.skip_train or complete)
    train_iter, valid_iter, test_iter = build_data_iterators(datasets, args, parallel, run, train)

    forward_step = partial(entry_forward_step, run=run)
    writer = ScalarWriter(args, is_last_rank())
    if train:
        _train_loop(forward_step, model, optimizer, scheduler, train_iter, valid_iter, args, parallel, run, writer,
                    start_time, summary)  # fmt: skip
    summary["iteration"] = run.iteration
    summary["loss_scale"] = optimizer.loss_scale
    full_batch = args.global_batch_size // (args.micro_batch_size * parallel.dp_size)
    for name, data in (("validation", valid_iter), ("test", test_iter)):
        summary["valid" if name == "validation" else "test"] = evaluate_and_print(
            f"{name} loss at the end of training (iteration {run.iteration})",
            forward_step, data, model, full_batch, args, parallel, writer, run,
        )  # fmt: skip
    writer.close()
    return summary


def train_iteration(
    forward_step: ForwardStep,
    data_iterator: Iterator,
    model: DistributedDataParallel,
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    global_batch: int,
    args: argparse.Namespace,
    parallel: ParallelState,
    run: RunState,
    logger: IntervalLogger,
    flops: float,
    micro_batch_sequences: Optional[int] = None,
) -> dict[str, float]:
    """One iteration of a training loop (pretraining or fine-tuning): train_step, the counters in `run`,
    the learning-rate schedule, the log line; stops the run after --max-nan-iterations bad iterations."""
    num_micro = global_batch // (args.micro_batch_size * parallel.dp_size)
    losses, update_successful, grad_norm, num_zeros = train_step(
        forward_step, data_iterator, model, optimizer, num_micro, args, parallel, logger.timers,
        micro_batch_sequences,
    )  # fmt: skip
    run.iteration += 1
    run.consumed_train_samples += global_batch
    if update_successful:
        scheduler.step(increment=global_batch)
    step = StepStats(losses, update_successful, grad_norm, global_batch, scheduler.get_lr(), optimizer.loss_scale,
                     flops)  # fmt: skip
    if args.log_num_zeros_in_grad and update_successful:
        step.num_zeros = num_zeros
    if args.log_params_norm:
        step.params_norm = optimizer.params_norm()
    logger.record(run.iteration, run.consumed_train_samples, step)
    if logger.consecutive_bad >= args.max_nan_iterations:
        raise TrainingError(
            f"{logger.consecutive_bad} consecutive iterations (up to {run.iteration}) had NaN/inf losses or "
            "gradients; stopping without saving. The last checkpoint in --save is intact: lower --lr, check "
            "the data, or raise --max-nan-iterations."
        )
    return losses


def _train_loop(
    forward_step: ForwardStep,
    model: DistributedDataParallel,
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    train_iter: Iterator,
    valid_iter: Optional[Iterator],
    args: argparse.Namespace,
    parallel: ParallelState,
    run: RunState,
    writer: ScalarWriter,
    start_time: float,
    summary: dict,
) -> None:
    train_iters, _ = train_schedule(args)

    def save() -> None:
        if args.save:
            model.finish_param_gather()  # the weights must be complete before they are written
            save_checkpoint(run.iteration, model.module, optimizer, scheduler, run.checkpoint_args(args),
                            parallel, args.save, save_optim=not args.no_save_optim,
                            save_rng=not args.no_save_rng)  # fmt: skip

    calculator = MicroBatchCalculator(
        args.global_batch_size, args.micro_batch_size, parallel.dp_size, args.rampup_batch_size
    )
    model.train()
    logger = IntervalLogger(args, train_iters, writer, partial(print_rank_last, parallel))
    while run.iteration < train_iters:
        calculator.update(run.consumed_train_samples)
        global_batch = calculator.current_global_batch_size
        flops = hardware_flops(
            global_batch, args.seq_length, args.num_layers, args.hidden_size, run.padded_vocab_size,
            args.recompute_granularity, **flops_shape(args),
        )  # fmt: skip
        losses = train_iteration(forward_step, train_iter, model, optimizer, scheduler, global_batch, args,
                                 parallel, run, logger, flops)  # fmt: skip
        summary["losses"].append(losses)
        summary["skipped_iterations"] = logger.skipped
        iteration = run.iteration

        saved = bool(args.save_interval and iteration % args.save_interval == 0)
        if saved:
            save()
        if args.eval_interval and iteration % args.eval_interval == 0 and iteration < train_iters:
            evaluate_and_print(
                f"validation loss at iteration {iteration}",
                forward_step, valid_iter, model, calculator.num_micro_batches, args, parallel, writer, run,
            )  # fmt: skip
        timed_out = args.exit_duration_in_mins is not None and any_rank(
            (time.time() - start_time) / 60.0 > args.exit_duration_in_mins
        )
        if timed_out or (args.exit_interval and iteration % args.exit_interval == 0):
            if not saved:
                save()
            print_rank_0(parallel, f"exiting program at iteration {iteration}")
            return
    if not (args.save_interval and run.iteration % args.save_interval == 0):
        save()
    model.finish_param_gather()
