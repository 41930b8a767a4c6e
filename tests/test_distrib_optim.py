"""The distributed optimizer (ZeRO-1): same training as the plain optimizer, sharded state, its checkpoint
(distrib_optim.pt, independent of the DP size), its collectives, and its errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron.arguments import parse_args, transformer_config_from_args
from megatron.distributed import DistributedDataParallel
from megatron.model import GPTModel
from megatron.optimizer import OptimizerConfig, build_optimizer
from megatron.optimizer.distrib_optim import DistributedOptimizer
from megatron.parallel.random import model_parallel_seed
from megatron.parallel.state import initialize_model_parallel
from tests.collectives import count_collectives
from tests.distributed_utils import run_distributed
from tests.training_compare import (
    ADAM_EPS,
    NO_DROPOUT,
    TINY,
    assert_curves_close,
    assert_params_close,
    randomise_,
    saved_file,
    saved_params,
    train,
)
from tools.checkpoint import reshard
from tools.checkpoint.optimizer_state import _same, optimizer_param_names

ROOT = Path(__file__).resolve().parents[1]
ZERO = ["--use-distributed-optimizer"]
SMALL_BUCKETS = ["--ddp-bucket-size", "3000"]  # several buckets, each padded to a multiple of DP


def _variants(rank: int, world_size: int, root: str, variants: dict[str, list]) -> dict[str, list[float]]:
    base = [*TINY, *ADAM_EPS, "--train-iters", 4, "--global-batch-size", 8]
    return {name: train([*base, *extra], save=os.path.join(root, name)) for name, extra in variants.items()}


def _check_against_plain(root: str, results: list[dict], pairs: dict[str, str]) -> None:
    """Each variant's loss curve, final weights, fp32 masters and Adam moments (and fp16 loss scaler) equal
    those of its plain-optimizer run `pairs[variant]`. Half-precision weights may differ by one rounding."""
    for name, plain in pairs.items():
        for rank_result in results:
            assert_curves_close(rank_result[name], rank_result[plain], rtol=1e-5)
        plain_params = saved_params(os.path.join(root, plain))
        plain_optimizer = saved_file(os.path.join(root, plain))["optimizer"]
        half = "fp32_from_fp16_params" in plain_optimizer
        plain_names = [n for group in optimizer_param_names(plain_params) for n in group]
        plain_masters = [t for g in plain_optimizer["fp32_from_fp16_params"] for t in g] if half else None
        plain_state = plain_optimizer["optimizer"] if half else plain_optimizer
        assert_params_close(saved_params(os.path.join(root, name)), plain_params, rtol=1e-2 if half else 1e-5)
        common = saved_file(os.path.join(root, name))["optimizer"]
        assert "state" not in common["optimizer"]  # the moments live in distrib_optim.pt only
        assert _same(common.get("grad_scaler"), plain_optimizer.get("grad_scaler"))
        sharded = saved_file(os.path.join(root, name), name="distrib_optim.pt")
        for index, param_name in enumerate(plain_names):
            entry = sharded["param_state"][param_name]
            master = plain_masters[index] if half else plain_params[param_name]
            torch.testing.assert_close(entry["param"], master, rtol=1e-5, atol=1e-7)
            for key in ("exp_avg", "exp_avg_sq"):
                want = plain_state["state"][index][key]
                torch.testing.assert_close(entry[key], want, rtol=1e-5, atol=1e-9, msg=f"{param_name} {key}")


def test_dp2_matches_plain_optimizer_with_dropout(tmp_path):
    """DP 2, dropout on, several padded buckets; with --overlap-param-gather; bf16; fp16 loss scaling."""
    fp16 = ["--fp16", "--initial-loss-scale", "65536"]
    variants = {
        "plain": [],
        "zero": [*ZERO, *SMALL_BUCKETS],
        "zero_overlap": [*ZERO, "--overlap-param-gather"],
        "plain_bf16": ["--bf16"],
        "zero_bf16": [*ZERO, "--bf16", *SMALL_BUCKETS],
        "plain_fp16": fp16,
        "zero_fp16": [*ZERO, *fp16, *SMALL_BUCKETS],
    }
    results = run_distributed(_variants, 2, args=(str(tmp_path), variants))
    pairs = {"zero": "plain", "zero_overlap": "plain", "zero_bf16": "plain_bf16", "zero_fp16": "plain_fp16"}
    _check_against_plain(str(tmp_path), results, pairs)


@pytest.mark.slow
def test_dp4_matches_plain_optimizer_with_dropout(tmp_path):
    variants = {"plain": [], "zero": [*ZERO, *SMALL_BUCKETS]}
    results = run_distributed(_variants, 4, args=(str(tmp_path), variants))
    _check_against_plain(str(tmp_path), results, {"zero": "plain"})


# --- collectives ---------------------------------------------------------------------------------------


def _one_step_each(rank: int, world_size: int) -> dict[bool, tuple]:
    parallel = initialize_model_parallel(1)
    return {zero: _one_step(rank, parallel, zero) for zero in (False, True)}


def _one_step(rank: int, parallel, zero: bool) -> tuple[int, dict[str, int], float, bool]:
    """(buckets, collectives of one iteration, its grad norm, whether the next step, with an inf in
    DP rank 1's part of the gradient only, was applied)."""
    args = parse_args([*TINY, "--train-iters", "4"], world_size=parallel.dp_size)
    model_parallel_seed(1, parallel)
    model = GPTModel(transformer_config_from_args(args, 256), parallel)
    randomise_(model, parallel)
    ddp = DistributedDataParallel(model, parallel, bucket_size=3000, use_distributed_optimizer=zero)
    optimizer = build_optimizer(ddp, OptimizerConfig(lr=1e-3, use_distributed_optimizer=zero), parallel)
    assert isinstance(optimizer, DistributedOptimizer) == zero
    tokens = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(rank))
    positions = torch.arange(32).expand(2, 32)

    def backward() -> None:
        optimizer.zero_grad()
        ddp(tokens, positions, labels=tokens).mean().backward()
        ddp.finish_grad_sync()

    with count_collectives() as calls:
        backward()
        applied, grad_norm, _ = optimizer.step()
    assert applied
    if not zero:
        return len(ddp.buckets), dict(calls), grad_norm, True
    backward()
    if rank == 1:  # the last element of rank 1's shard of the gradient; rank 0 never sees it
        optimizer._main_grads()[-1].view(-1)[-1] = float("inf")
    return len(ddp.buckets), dict(calls), grad_norm, optimizer.step()[0]


def test_one_step_collectives_norm_and_overflow():
    """Plain: one all-reduce per bucket. ZeRO: one reduce-scatter and one all-gather per bucket, and one
    all-reduce over DP of the gradient norm's partial sums (no gradient all-reduce); the same gradient norm
    (the whole gradient's); an inf on one DP rank's shard makes every rank skip the step."""
    for result in run_distributed(_one_step_each, 2):
        buckets, calls, plain_norm, _ = result[False]
        assert buckets > 2 and calls == {"all_reduce": buckets}
        buckets, calls, zero_norm, applied = result[True]
        assert buckets > 2
        assert calls == {"reduce_scatter_single": buckets, "all_gather_single": buckets, "all_reduce": 1}
        assert abs(zero_norm - plain_norm) <= 1e-6 * plain_norm
        assert not applied


# --- checkpoints ---------------------------------------------------------------------------------------


def _dp_resume(rank: int, world_size: int, argv: list, save: str, load) -> list[float]:
    return train(argv, save=save, load=load)


def test_checkpoint_saved_at_dp2_resumes_at_dp1_without_the_flag(tmp_path):
    base = [*TINY, *NO_DROPOUT, "--global-batch-size", 8, "--train-iters", 6]
    straight = train(base)  # one process
    ckpt = str(tmp_path / "ckpt")
    first = run_distributed(
        _dp_resume, 2, args=([*base, *ZERO, *SMALL_BUCKETS, "--exit-interval", 3], ckpt, None)
    )[0]
    assert os.path.isfile(os.path.join(ckpt, "iter_0000003", "mp_rank_00", "distrib_optim.pt"))
    second = train(base, save=ckpt, load=ckpt)  # one process, plain optimizer
    assert_curves_close(first + second, straight, rtol=1e-5)


@pytest.mark.slow
def test_resume_across_dp_sizes_2_4_1(tmp_path):
    base = [*TINY, *NO_DROPOUT, "--global-batch-size", 8, "--train-iters", 6]
    straight = train(base)
    ckpt = str(tmp_path / "ckpt")
    first = run_distributed(_dp_resume, 2, args=([*base, *ZERO, "--exit-interval", 2], ckpt, None))[0]
    second = run_distributed(_dp_resume, 4, args=([*base, *ZERO, "--exit-interval", 4], ckpt, ckpt))[0]
    third = train(base, save=ckpt, load=ckpt)
    assert_curves_close(first + second + third, straight, rtol=1e-5)


def test_plain_checkpoint_resumes_with_the_distributed_optimizer(tmp_path):
    base = [*TINY, *NO_DROPOUT, "--global-batch-size", 4, "--train-iters", 4]
    straight = train(base)
    ckpt = tmp_path / "ckpt"
    first = train([*base, "--exit-interval", 2], save=ckpt)
    second = train([*base, *ZERO], save=ckpt, load=ckpt)
    assert first + second == straight  # one process: the same arithmetic, bitwise


def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a distributed-optimizer run that saves every iteration; the latest checkpoint, with its
    distrib_optim.pt, loads and training continues."""
    ckpt = tmp_path / "ckpt"
    argv = [sys.executable, str(ROOT / "pretrain_gpt.py"), *TINY, *ZERO, "--train-iters", "100000",
            "--save", str(ckpt), "--save-interval", "1"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 120
    while not (tracker.exists() and int(tracker.read_text()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.137)  # land somewhere inside a later save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = int(tracker.read_text())
    assert (ckpt / f"iter_{saved:07d}" / "mp_rank_00" / "distrib_optim.pt").is_file()
    losses = train([*TINY, *ZERO, "--train-iters", 100000, "--exit-interval", saved + 1], load=ckpt)
    assert len(losses) == 1


# --- errors --------------------------------------------------------------------------------------------


def _error_of(argv: list, capsys, **kwargs) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train(argv, **kwargs)
    assert exit_info.value.code != 0
    return capsys.readouterr().err


def test_optimizer_that_cannot_be_sharded_is_refused(capsys):
    err = _error_of([*TINY, "--train-iters", 4, *ZERO, "--optimizer", "sgd"], capsys)
    assert (
        "error: --use-distributed-optimizer shards Adam's state only: --optimizer sgd cannot be sharded"
        in err
    )


def test_overlap_param_gather_needs_the_distributed_optimizer(capsys):
    err = _error_of([*TINY, "--train-iters", 4, "--overlap-param-gather"], capsys)
    assert "error: --overlap-param-gather needs --use-distributed-optimizer" in err


def test_missing_or_mismatched_distrib_optim_file_is_a_clear_error(tmp_path, capsys):
    base = [*TINY, "--global-batch-size", 4, "--train-iters", 4]
    ckpt = tmp_path / "ckpt"
    train([*base, *ZERO, "--exit-interval", 2], save=ckpt)
    err = _error_of([*base, "--optimizer", "sgd"], capsys, load=ckpt)
    assert "holds adam state but this run uses --optimizer sgd" in err and "Traceback" not in err
    distrib = ckpt / "iter_0000002" / "mp_rank_00" / "distrib_optim.pt"
    distrib.unlink()
    for flags in ([], ZERO):
        err = _error_of([*base, *flags], capsys, load=ckpt)
        assert f"{distrib} not found" in err and "--no-load-optim" in err and "Traceback" not in err
    assert len(train([*base, *ZERO, "--no-load-optim"], load=ckpt)) == 2


# --- resharding ----------------------------------------------------------------------------------------


def _continue(rank: int, world_size: int, argv: list, ckpt: str) -> list[float]:
    return train(argv, load=ckpt)


def test_reshard_carries_distrib_optim_state_across_tp(tmp_path):
    """TP 1 -> 2 -> 1 is bitwise; the TP 2 copy continues training as the TP 1 checkpoint does."""
    base = [*TINY, *NO_DROPOUT, *ZERO, "--global-batch-size", 4, "--train-iters", 4]
    ckpt, tp2, back = tmp_path / "tp1", tmp_path / "tp2", tmp_path / "back"
    train([*base, "--exit-interval", 2], save=ckpt)
    for source, target, tp in ((ckpt, tp2, 2), (tp2, back, 1)):
        reshard.main(["--load", str(source), "--save", str(target), "--target-tensor-model-parallel-size",
                      str(tp), "--keep-optimizer"])  # fmt: skip
    for name in ("model_optim_rng.pt", "distrib_optim.pt"):
        before, after = saved_file(str(ckpt), name=name), saved_file(str(back), name=name)
        for key in ("model", "optimizer", "param_state", "step"):
            if key in before:
                assert _same(after[key], before[key]), (name, key)
    tp2_state = saved_file(str(tp2), tp_rank=1, name="distrib_optim.pt")["param_state"]
    assert tp2_state["language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"]["exp_avg"].shape == (64, 32)
    straight = train(base, load=ckpt)
    resumed = run_distributed(_continue, 2, args=([*base, "--tensor-model-parallel-size", 2], str(tp2)))[0]
    assert_curves_close(resumed, straight, rtol=1e-5)
