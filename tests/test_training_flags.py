"""Flags that change what a run writes or logs: --no-save-optim/--no-save-rng, --log-num-zeros-in-grad,
--log-params-norm, --log-timers-to-tensorboard, --log-memory-to-tensorboard."""

from __future__ import annotations

import argparse
import math
import re

import pytest
import torch

import pretrain_gpt
from megatron.optimizer.clip_grads import count_zeros, l2_norm
from megatron.parallel.state import initialize_model_parallel
from tests.distributed_utils import run_distributed
from tests.test_training import MOCK, NO_DROPOUT, TINY


def _train(argv: list) -> dict:
    return pretrain_gpt.main([str(a) for a in argv])


def _shard(tmp_path, iteration: int) -> dict:
    path = tmp_path / f"iter_{iteration:07d}" / "mp_rank_00" / "model_optim_rng.pt"
    return torch.load(path, weights_only=False)


def test_no_save_optim_and_rng_leave_the_keys_out_and_loading_asks_for_the_flags(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    _train([*TINY, *MOCK, "--train-iters", 3, "--save", ckpt, "--no-save-optim", "--no-save-rng"])
    state = _shard(ckpt, 3)
    assert not {"optimizer", "opt_param_scheduler", "rng_state"} & set(state) and "model" in state
    with pytest.raises(SystemExit):
        _train([*TINY, *MOCK, "--train-iters", 5, "--load", ckpt])
    assert "holds no 'optimizer'; load it with --no-load-optim" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _train([*TINY, *MOCK, "--train-iters", 5, "--load", ckpt, "--no-load-optim"])
    assert "holds no 'rng_state'; load it with --no-load-rng" in capsys.readouterr().err
    summary = _train([*TINY, *MOCK, "--train-iters", 5, "--load", ckpt, "--no-load-optim", "--no-load-rng"])
    assert summary["iteration"] == 5 and len(summary["losses"]) == 2


# --- num zeros and params norm -------------------------------------------------------------------------

# Positions 32..63 of a 64-row position table never occur in 32-token samples: their gradient rows are
# exactly zero, (64 - 32) x hidden 32 = 1024 elements. The only other gradients that are zero in exact
# arithmetic are the key biases' (adding b to every key adds q.b to all scores of a row, which softmax
# ignores): 2 layers x 32 elements, numerically tiny and sometimes exactly 0. So 1024 <= zeros <= 1088.
ZEROS_ARGV = [*TINY, *MOCK, *NO_DROPOUT, "--max-position-embeddings", 64, "--train-iters", 2, "--lr-warmup-iters", 0,
              "--global-batch-size", 4, "--log-interval", 1, "--log-num-zeros-in-grad", "--log-params-norm"]  # fmt: skip
LINE = re.compile(
    r"grad norm: [0-9.]+ \| num zeros: ([0-9.]+) \| params norm: ([0-9.]+) \| number of skipped"
)


def _logged(capsys) -> list[tuple[float, float]]:
    return [(float(z), float(n)) for z, n in LINE.findall(capsys.readouterr().out)]


def test_num_zeros_and_params_norm_in_the_log_line(tmp_path, capsys):
    _train([*ZEROS_ARGV, "--save", tmp_path])
    logged = _logged(capsys)
    assert len(logged) == 2 and all(1024 <= zeros <= 1024 + 64 for zeros, _ in logged), logged
    # The norm after the last step, from the saved weights (an independent sum over the whole model).
    weights = [t for t in _flatten(_shard(tmp_path, 2)["model"]) if t.is_floating_point()]
    expected = math.sqrt(sum(float(t.double().square().sum()) for t in weights))
    assert logged[-1][1] == pytest.approx(expected, abs=1e-3)


def _flatten(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    return [t for value in tree.values() for t in _flatten(value)] if isinstance(tree, dict) else []


def _zeros_at_tp2(rank: int, world_size: int) -> None:
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        _train([*ZEROS_ARGV, "--tensor-model-parallel-size", 2])
    if rank == world_size - 1:  # the iteration line is printed by the last rank (Megatron's print_rank_last)
        return [(float(z), float(n)) for z, n in LINE.findall(out.getvalue())]


def test_num_zeros_and_params_norm_are_whole_model_values_at_tp2(capsys):
    """TP-split tensors count on every rank, duplicated ones (position embeddings) once: same as TP=1."""
    _train(ZEROS_ARGV)
    single = _logged(capsys)
    tp2 = run_distributed(_zeros_at_tp2, 2)[-1]
    assert len(tp2) == len(single) == 2
    assert all(1024 <= zeros <= 1024 + 64 for zeros, _ in tp2 + single), (tp2, single)
    for (_, norm2), (_, norm1) in zip(tp2, single):
        assert norm2 == pytest.approx(norm1, rel=1e-5)


def _count_on_two_ranks(rank: int, world_size: int) -> tuple[float, float]:
    parallel = initialize_model_parallel(2, 1)
    split = torch.tensor([0.0, 1.0, 0.0]) if rank == 0 else torch.tensor([2.0, 0.0, 3.0])
    duplicate = torch.tensor([0.0, 0.0, 4.0])  # the same on both ranks: counted on TP rank 0 only
    counted = [True, rank == 0]
    return count_zeros([split, duplicate], counted, parallel), l2_norm([split, duplicate], counted, parallel)


def test_count_zeros_and_norm_reduce_over_tensor_parallel_ranks():
    for zeros, norm in run_distributed(_count_on_two_ranks, 2):
        assert zeros == 2 + 1 + 2  # rank 0's split, rank 1's split, the duplicate once
        assert norm == pytest.approx(math.sqrt(1 + 4 + 9 + 16))


# --- TensorBoard timers and memory -----------------------------------------------------------------------


def test_timers_and_memory_are_written_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train([*TINY, *MOCK, "--train-iters", 4, "--log-interval", 2, "--tensorboard-dir", tmp_path,
            "--log-timers-to-tensorboard", "--log-memory-to-tensorboard"])  # fmt: skip
    events = EventAccumulator(str(tmp_path))
    events.Reload()

    def values(tag: str) -> list[float]:
        return [e.value for e in events.Scalars(tag)]

    memory = "mem-allocated-bytes" if torch.cuda.is_available() else "mem-max-rss-bytes"
    for tag in ("forward-backward-time", "optimizer-time", memory):
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("iteration-time")] == [2, 4]
    forward_backward, optimizer, iteration = (
        values("forward-backward-time"),
        values("optimizer-time"),
        values("iteration-time"),
    )
    assert all(t > 0 for t in forward_backward + optimizer)
    # The phases are parts of the iteration: over iterations 3 and 4, their sum is at most the iteration time.
    assert forward_backward[2] + optimizer[2] + forward_backward[3] + optimizer[3] <= 2 * iteration[1] * 1.01
    assert min(values(memory)) > 50 * 2**20  # torch alone takes more than 50 MiB


# --- flags that reach the scheduler, the loss scaler, the data loader, DDP, the writers ---------------

SCHEDULE = "--lr 1.0 --min-lr 0.1 --lr-warmup-init 0.5 --lr-decay-style linear --micro-batch-size 2".split()
WEIGHT_DECAY = "--weight-decay-incr-style linear --start-weight-decay 0.0 --end-weight-decay 0.1".split()


def _schedule(extra: list[str]) -> list[tuple[float, float]]:
    """(lr, weight decay) after 0..7 iterations of 2 samples, from the scheduler pretrain() builds."""
    from types import SimpleNamespace

    from megatron.arguments import parse_args
    from megatron.training import build_scheduler

    args = parse_args([str(a) for a in [*TINY[:10], *MOCK, *SCHEDULE, *WEIGHT_DECAY, *extra]])
    scheduler = build_scheduler(SimpleNamespace(param_groups=[{"wd_mult": 1.0}]), args)
    values = []
    for _ in range(8):
        values.append((scheduler.get_lr(), scheduler.get_wd()))
        scheduler.step(increment=2)
    return values


@pytest.mark.parametrize(
    "length",
    [
        "--train-iters 10 --lr-warmup-iters 2 --lr-decay-iters 6",
        "--train-samples 20 --lr-warmup-samples 4 --lr-decay-samples 12",
    ],
)
def test_learning_rate_and_weight_decay_flags_reach_the_scheduler(length):
    # In samples: warmup 4 from 0.5 to 1.0, linear decay to 0.1 at 12; weight decay 0 -> 0.1 over 20.
    lr = [0.5, 0.75, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1]
    wd = [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07]
    got = _schedule(length.split())
    assert [v for v, _ in got] == pytest.approx(lr) and [w for _, w in got] == pytest.approx(wd)


def test_old_checkpoint_lr_scheduler_flag_reaches_the_scheduler():
    from types import SimpleNamespace

    from megatron.arguments import parse_args
    from megatron.training import build_scheduler

    args = parse_args([str(a) for a in [*TINY, *MOCK, "--train-iters", 10, "--use-checkpoint-lr-scheduler"]])
    assert build_scheduler(
        SimpleNamespace(param_groups=[{"wd_mult": 1.0}]), args
    ).use_checkpoint_opt_param_scheduler


def test_static_and_minimum_loss_scale():
    fixed = _train([*TINY, *MOCK, "--train-iters", 3, "--fp16", "--loss-scale", 1024])
    assert fixed["loss_scale"] == 1024.0 and fixed["skipped_iterations"] == 0
    # 2^60 overflows fp16 every step: the dynamic scale halves per overflow (hysteresis 1) down to the floor.
    floor = _train([*TINY, *MOCK, "--train-iters", 4, "--fp16", "--initial-loss-scale", 2.0**60,
                    "--min-loss-scale", 2.0**58, "--hysteresis", 1])  # fmt: skip
    assert floor["loss_scale"] == 2.0**58 and floor["skipped_iterations"] == 4


def test_data_loader_workers_give_the_same_batches():
    base = [*TINY, *MOCK, *NO_DROPOUT, "--train-iters", 3]
    assert _train([*base, "--num-workers", 1])["losses"] == _train(base)["losses"]


def test_ddp_bucket_size_sets_the_buckets():
    from megatron.arguments import parse_args
    from megatron.parallel.state import single_process_state
    from megatron.run_state import RunState
    from megatron.training import setup_model_and_optimizer

    def buckets(extra: list) -> tuple[int, int]:
        args = parse_args([str(a) for a in [*TINY, *MOCK, "--train-iters", 3, *extra]])
        model, _, _ = setup_model_and_optimizer(pretrain_gpt.model_provider, args, single_process_state(),
                                                RunState(padded_vocab_size=256))  # fmt: skip
        return len(model.buckets), len(list(model.parameters()))

    assert buckets([])[0] == 1  # the default 40M elements hold the whole tiny model
    num_buckets, num_params = buckets(["--ddp-bucket-size", 1])
    assert num_buckets == num_params  # buckets of 1 element: one per parameter


def test_tensorboard_log_interval(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train([*TINY, *MOCK, "--train-iters", 4, "--tensorboard-dir", tmp_path, "--tensorboard-log-interval", 2])
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [e.step for e in events.Scalars("lm loss")] == [2, 4]


def test_wandb_project_and_name_reach_wandb(monkeypatch):
    import sys
    from types import SimpleNamespace

    calls = []
    run = SimpleNamespace(log=lambda scalars, step: calls.append(("log", step, dict(scalars))),
                          finish=lambda: calls.append(("finish",)))  # fmt: skip
    fake = SimpleNamespace(init=lambda **kw: calls.append(("init", kw)) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    _train([*TINY, *MOCK, "--train-iters", 3, "--wandb-project", "p", "--wandb-exp-name", "e"])
    assert calls[0][0] == "init" and calls[0][1]["project"] == "p" and calls[0][1]["name"] == "e"
    assert [c[1] for c in calls if c[0] == "log" and "lm loss" in c[2]] == [1, 2, 3]
    assert calls[-1] == ("finish",)


def test_distributed_timeout_reaches_the_process_group(monkeypatch):
    import datetime

    import torch.distributed as dist

    from megatron.arguments import parse_args
    from megatron.initialize import initialize_megatron

    seen = {}

    def init_process_group(backend, **kw):
        seen.update(kw)
        raise RuntimeError("stop here")

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parse_args(
        [str(a) for a in [*TINY, *MOCK, "--train-iters", 3, "--distributed-timeout-minutes", 7]]
    )
    with pytest.raises(RuntimeError, match="stop here"):
        initialize_megatron(args)
    assert seen["timeout"] == datetime.timedelta(minutes=7)


def test_bert_masking_flags_reach_the_dataset():
    """--mask-prob sets the masked fraction; --short-seq-prob the config whose sampling
    tests/test_data_bert_dataset.py::test_mapping_epochs_and_short_seq_prob checks."""
    import pretrain_bert
    from megatron.arguments import parse_args

    def dataset(*flags):
        argv = [*TINY, *MOCK, "--seq-length", 64, "--max-position-embeddings", 64, "--train-iters", 3, *flags]
        return pretrain_bert.train_valid_test_datasets_provider(
            [64, 0, 0], parse_args([str(a) for a in argv])
        )[0]

    def masked_fraction(train) -> float:
        masked = sum(float(train[i]["loss_mask"].sum()) for i in range(64))
        return masked / sum(float(train[i]["padding_mask"].sum()) for i in range(64))

    assert masked_fraction(dataset("--mask-prob", 0.15)) == pytest.approx(0.15, abs=0.03)
    assert masked_fraction(dataset("--mask-prob", 0.4)) == pytest.approx(0.4, abs=0.05)
    assert dataset("--short-seq-prob", 0.3).config.short_seq_prob == 0.3


def test_recompute_activations_is_selective_recompute():
    from megatron.arguments import parse_args, transformer_config_from_args

    args = parse_args([str(a) for a in [*TINY, *MOCK, "--train-iters", 3, "--recompute-activations"]])
    assert transformer_config_from_args(args, 256).recompute_granularity == "selective"


def test_document_flags_shape_the_gpt_batch():
    """--reset-position-ids, --reset-attention-mask, --eod-mask-loss on a sample packing two documents."""
    from megatron.arguments import parse_args

    eod = 200  # NullTokenizer(200)'s end-of-document id
    sample = torch.tensor([[5, 6, eod, 7, 8, 9, 1]])  # tokens 5 6 EOD | 7 8 9, label 1 after the last
    flags = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss"]
    args = parse_args([str(a) for a in [*TINY, *MOCK, "--train-iters", 3, *flags]])
    tokens, labels, loss_mask, attention_mask, position_ids = pretrain_gpt.get_batch(
        iter([{"text": sample}]), args, eod
    )
    assert tokens.tolist() == [[5, 6, eod, 7, 8, 9]] and labels.tolist() == [[6, eod, 7, 8, 9, 1]]
    assert position_ids.tolist() == [[0, 1, 2, 0, 1, 2]]
    assert loss_mask.tolist() == [[1.0, 1.0, 0.0, 1.0, 1.0, 1.0]]
    blocked = [[int((q >= 3) != (k >= 3)) for k in range(6)] for q in range(6)]  # across the two documents
    assert attention_mask[0, 0].int().tolist() == blocked
    plain = parse_args([str(a) for a in [*TINY, *MOCK, "--train-iters", 3]])
    _, _, loss_mask, attention_mask, position_ids = pretrain_gpt.get_batch(
        iter([{"text": sample}]), plain, eod
    )
    assert attention_mask is None and position_ids.tolist() == [list(range(6))] and loss_mask.min() == 1.0


def test_log_line_counts_skipped_and_nan_iterations_per_interval():
    """Megatron's line reports the skipped and NaN iterations of its own interval (the counters restart after
    each line); the run's total stays available for the summary."""

    from megatron.training_log import IntervalLogger, StepStats

    args = argparse.Namespace(
        log_interval=2, tensorboard_log_interval=1000, log_timers_to_tensorboard=False,
        log_memory_to_tensorboard=False, fp16=True, world_size=1,
    )  # fmt: skip

    class NoWriter:
        def add_scalars(self, scalars, iteration):
            pass

    lines: list[str] = []
    logger = IntervalLogger(args, 6, NoWriter(), lines.append)
    # interval 1: two overflows, one with a NaN loss; interval 2: one overflow; interval 3: none
    for iteration, (ok, loss) in enumerate([(False, math.nan), (False, 1.0), (True, 1.0), (False, 1.0),
                                            (True, 1.0), (True, 1.0)], start=1):  # fmt: skip
        step = StepStats({"lm loss": loss}, ok, None, 4, 1e-3, 1.0, 0.0)
        logger.record(iteration, 4 * iteration, step)
    counts = [
        (
            int(re.search(r"skipped iterations: +(\d+)", line)[1]),
            int(re.search(r"nan iterations: +(\d+)", line)[1]),
        )
        for line in lines
        if "iteration" in line and "/" in line
    ]
    assert counts == [(2, 1), (1, 0), (0, 0)]
    assert logger.skipped == 3
