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
    model_provider(args, parallel[, stage=StageLayout]) -> nn.Module   (stage: this pipeline stage's layers)
    forward_step(data_iterator, model, args, parallel) -> (output, loss_func)
        where loss_func(output) -> (loss: scalar tensor, {name: scalar tensor} to log)
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Iterator
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron.arguments import ExtraArgsProvider, parse_args
from megatron.checkpointing import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from megatron.data.samplers import build_data_loader
from megatron.distributed import DistributedDataParallel
from megatron.initialize import initialize_megatron
from megatron.lr_scheduler import OptimizerParamScheduler
from megatron.microbatches import MicroBatchCalculator
from megatron.model.utils import hardware_flops
from megatron.optimizer import MegatronOptimizer, OptimizerConfig, build_optimizer
from megatron.parallel.state import ParallelState, describe_grid, print_rank_0, print_rank_last
from megatron.pipeline import PipelineSetupError, build_model, forward_backward, forward_only
from megatron.schedules import broadcast_from_last_stage
from megatron.tokenizer import build_tokenizer, vocab_size_with_padding
from megatron.training_log import IntervalLogger, ScalarWriter, format_eval_block

DatasetsProvider = Callable[[list, argparse.Namespace], tuple]
ModelProvider = Callable[[argparse.Namespace, ParallelState], nn.Module]
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
    )


def build_scheduler(optimizer: MegatronOptimizer, args: argparse.Namespace) -> OptimizerParamScheduler:
    """Megatron counts scheduler steps in samples: iterations are converted with the global batch size."""
    if args.train_iters is not None:
        decay_steps = (args.lr_decay_iters or args.train_iters) * args.global_batch_size
        wd_incr_steps = args.train_iters * args.global_batch_size
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
    if parallel.dp_group is not None:
        dist.all_reduce(values, group=parallel.dp_group)
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
) -> tuple[dict[str, float], bool, Optional[float]]:
    """Forward/backward over all microbatches, gradient sync, optimizer step.

    Returns (losses averaged over microbatches and DP ranks, update_successful, grad norm).
    """
    optimizer.zero_grad()
    stats = forward_backward(
        forward_step, data_iterator, model, num_microbatches, args, parallel, optimizer.scale_loss
    )
    update_successful, grad_norm, _ = optimizer.step()
    losses = broadcast_from_last_stage(_average_over_dp(stats, parallel), parallel)
    return losses, update_successful, grad_norm


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
        args.consumed_valid_samples += args.global_batch_size
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
    iteration: int,
) -> Optional[dict[str, float]]:
    if data_iterator is None or args.eval_iters == 0:
        return None
    losses = evaluate(forward_step, data_iterator, model, num_microbatches, args, parallel)
    print_rank_last(parallel, format_eval_block(prefix, losses))
    tag = prefix.split()[0]
    scalars = {f"{name} {tag}": v for name, v in losses.items()}
    scalars.update({f"{name} {tag} ppl": math.exp(min(20.0, v)) for name, v in losses.items()})
    writer.add_scalars(scalars, iteration)
    return losses


def _any_rank(flag: bool) -> bool:
    """True on every rank when the flag is true on any rank (so all ranks take the same branch)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def setup_model_and_optimizer(
    model_provider: ModelProvider, args: argparse.Namespace, parallel: ParallelState
) -> tuple[DistributedDataParallel, MegatronOptimizer, OptimizerParamScheduler]:
    """Build the model in fp32 (TP-independent initialisation), cast it to the training dtype, wrap it
    for data parallelism, and build the optimizer and its learning-rate scheduler."""
    model = build_model(model_provider, args, parallel)
    if args.params_dtype != torch.float32:
        model = model.to(dtype=args.params_dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    model = DistributedDataParallel(
        model, parallel, bucket_size=args.ddp_bucket_size, overlap_grad_reduce=args.overlap_grad_reduce
    )
    optimizer = build_optimizer(model, optimizer_config_from_args(args), parallel)
    scheduler = build_scheduler(optimizer, args)
    return model, optimizer, scheduler


def load_for_training(
    model: DistributedDataParallel,
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    args: argparse.Namespace,
    parallel: ParallelState,
) -> int:
    """Resume from --load (or start fresh when it holds no checkpoint); returns the iteration."""
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
        )
    except ValueError as e:  # the scheduler refuses settings that contradict the checkpoint's
        raise CheckpointError(f"{args.load}: {e}") from None
    if ckpt_args is None:
        return 0
    release = read_metadata(args.load)[1]
    if args.finetune or args.no_load_optim or release:
        optimizer.reload_model_params()  # fp32 main weights from the loaded (bf16/fp16) model weights
    if not args.finetune:
        args.consumed_train_samples = getattr(ckpt_args, "consumed_train_samples", 0)
        args.consumed_valid_samples = getattr(ckpt_args, "consumed_valid_samples", 0)
    print_rank_0(parallel, f"> loaded checkpoint from {args.load} at iteration {iteration}")
    return iteration


def build_data_iterators(
    datasets: tuple, args: argparse.Namespace, parallel: ParallelState
) -> tuple[Optional[Iterator], ...]:
    """Iterators over this data-parallel rank's micro batches; training resumes at the consumed samples.
    Validation and test iterators cycle, so any number of evaluations can draw from them."""
    train_ds, valid_ds, test_ds = datasets
    loader = partial(
        build_data_loader,
        micro_batch_size=args.micro_batch_size,
        parallel_rank=parallel.dp_rank,
        parallel_size=parallel.dp_size,
        num_workers=args.num_workers,
    )
    train = loader(
        train_ds, args.consumed_train_samples, dataloader_type=args.dataloader_type, seed=args.seed
    )
    return (
        _data_iterator(train, args.dataloader_type == "cyclic"),
        _data_iterator(loader(valid_ds, args.consumed_valid_samples), True),
        _data_iterator(loader(test_ds, 0), True),
    )


def pretrain(
    train_valid_test_datasets_provider: DatasetsProvider,
    model_provider: ModelProvider,
    forward_step: ForwardStep,
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


def _pretrain(
    datasets_provider: DatasetsProvider,
    model_provider: ModelProvider,
    forward_step: ForwardStep,
    args: argparse.Namespace,
) -> dict:
    start_time = time.time()
    parallel = initialize_megatron(args)
    tokenizer = build_tokenizer(args)
    args.padded_vocab_size = vocab_size_with_padding(
        tokenizer.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
    )
    print_rank_0(
        parallel,
        f"> world size {args.world_size}: {describe_grid(parallel)}; "
        f"vocab {tokenizer.vocab_size} padded to {args.padded_vocab_size}",
    )

    model, optimizer, scheduler = setup_model_and_optimizer(model_provider, args, parallel)
    iteration = load_for_training(model, optimizer, scheduler, args, parallel) if args.load else 0
    try:
        datasets = datasets_provider(train_valid_test_num_samples(args), args)
    except (ValueError, OSError) as e:  # the data modules name the flag or file at fault
        raise TrainingError(f"data: {e}") from None
    train_iter, valid_iter, test_iter = build_data_iterators(datasets, args, parallel)

    writer = ScalarWriter(args, is_last_rank())
    calculator = MicroBatchCalculator(
        args.global_batch_size, args.micro_batch_size, parallel.dp_size, args.rampup_batch_size
    )
    summary: dict = {"iteration": iteration, "losses": [], "skipped_iterations": 0}
    if not args.skip_train:
        iteration = _train_loop(
            forward_step, model, optimizer, scheduler, train_iter, valid_iter, calculator, args, parallel,
            writer, iteration, start_time, summary,
        )  # fmt: skip
    summary["iteration"] = iteration
    summary["loss_scale"] = optimizer.loss_scale
    full_batch = args.global_batch_size // (args.micro_batch_size * parallel.dp_size)
    summary["valid"] = evaluate_and_print(
        f"validation loss at the end of training (iteration {iteration})",
        forward_step, valid_iter, model, full_batch, args, parallel, writer, iteration,
    )  # fmt: skip
    summary["test"] = evaluate_and_print(
        f"test loss at the end of training (iteration {iteration})",
        forward_step, test_iter, model, full_batch, args, parallel, writer, iteration,
    )  # fmt: skip
    writer.close()
    return summary


def _train_loop(
    forward_step: ForwardStep,
    model: DistributedDataParallel,
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    train_iter: Iterator,
    valid_iter: Optional[Iterator],
    calculator: MicroBatchCalculator,
    args: argparse.Namespace,
    parallel: ParallelState,
    writer: ScalarWriter,
    iteration: int,
    start_time: float,
    summary: dict,
) -> int:
    train_iters, _ = train_schedule(args)

    def save(it: int) -> None:
        if args.save:
            save_checkpoint(it, model.module, optimizer, scheduler, args, parallel, args.save)

    model.train()
    logger = IntervalLogger(args, train_iters, writer, partial(print_rank_last, parallel))
    consecutive_bad = 0
    while iteration < train_iters:
        calculator.update(args.consumed_train_samples)
        num_micro = calculator.num_micro_batches
        global_batch = calculator.current_global_batch_size
        losses, update_successful, grad_norm = train_step(
            forward_step, train_iter, model, optimizer, num_micro, args, parallel
        )
        iteration += 1
        args.consumed_train_samples += global_batch
        if update_successful:
            scheduler.step(increment=global_batch)
        summary["losses"].append(losses)
        flops = hardware_flops(
            global_batch, args.seq_length, args.num_layers, args.hidden_size, args.padded_vocab_size,
            args.recompute_granularity,
        )  # fmt: skip
        logger.record(
            iteration, losses, update_successful, grad_norm, global_batch, scheduler.get_lr(),
            optimizer.loss_scale, flops,
        )  # fmt: skip
        summary["skipped_iterations"] = logger.skipped

        # fp16 skips steps on overflow by design; otherwise a skipped step means NaN/inf gradients.
        bad = any(not math.isfinite(v) for v in losses.values()) or (not update_successful and not args.fp16)
        consecutive_bad = consecutive_bad + 1 if bad else 0
        if consecutive_bad >= args.max_nan_iterations:
            raise TrainingError(
                f"{consecutive_bad} consecutive iterations (up to {iteration}) had NaN/inf losses or gradients; "
                "stopping without saving. The last checkpoint in --save is intact: lower --lr, check the data, "
                "or raise --max-nan-iterations."
            )

        if args.save_interval and iteration % args.save_interval == 0:
            save(iteration)
        if args.eval_interval and iteration % args.eval_interval == 0 and iteration < train_iters:
            evaluate_and_print(
                f"validation loss at iteration {iteration}",
                forward_step, valid_iter, model, num_micro, args, parallel, writer, iteration,
            )  # fmt: skip
        timed_out = args.exit_duration_in_mins is not None and _any_rank(
            (time.time() - start_time) / 60.0 > args.exit_duration_in_mins
        )
        if timed_out or (args.exit_interval and iteration % args.exit_interval == 0):
            if not (args.save_interval and iteration % args.save_interval == 0):
                save(iteration)
            print_rank_0(parallel, f"exiting program at iteration {iteration}")
            return iteration
    if args.save and not (args.save_interval and iteration % args.save_interval == 0):
        save(iteration)
    return iteration
