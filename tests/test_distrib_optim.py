"""The distributed optimizer (ZeRO-1): same training as the plain optimizer, sharded state, its checkpoint
(distrib_optim.pt, independent of the DP size), its collectives, and its errors."""

from __future__ import annotations

import os

import pytest
import torch

from megatron.arguments import parse_args, transformer_config_from_args
from megatron.distributed import DistributedDataParallel
from megatron.model import GPTModel
from megatron.optimizer import OptimizerConfig, build_optimizer
from megatron.optimizer.distrib_optim import DistributedOptimizer
from megatron.parallel.random import model_parallel_seed
from megatron.parallel.state import initialize_model_parallel
from tests.collective_counter import collectives, count_distributed_calls
from tests.distributed_utils import run_distributed
from tests.training_compare import (
    NO_DROPOUT,
    TINY,
    assert_curves_close,
    assert_params_close,
    randomise_,
    saved_file,
    saved_params,
    train,
)
from tools.checkpoint.optimizer_state import optimizer_param_names

ZERO = ["--use-distributed-optimizer"]
SMALL_BUCKETS = ["--ddp-bucket-size", "3000"]  # several buckets, each padded to a multiple of DP


# The gradient of the key bias is zero in exact arithmetic (softmax ignores a per-query constant), so in
# floating point it is rounding noise, which Adam with a tiny eps turns into lr-sized steps that differ
# with the summation order of the DP reduction (4 ranks: all-reduce vs reduce-scatter). eps = 1e-5 keeps
# such noise (~1e-10) from moving weights while leaving real gradients' updates unchanged in character.
ADAM_EPS = ["--adam-eps", "1e-5"]


def _variants(rank: int, world_size: int, root: str, variants: dict[str, list]) -> dict[str, list[float]]:
    base = [*TINY, *ADAM_EPS, "--train-iters", 4, "--global-batch-size", 8]
    return {name: train([*base, *extra], save=os.path.join(root, name)) for name, extra in variants.items()}


def _check_against_plain(root: str, results: list[dict], names: list[str]) -> None:
    """Every variant's loss curve, final weights, fp32 masters and Adam moments equal the plain run's."""
    plain_params = saved_params(os.path.join(root, "plain"))
    plain_optimizer = saved_file(os.path.join(root, "plain"))["optimizer"]
    plain_names = [n for group in optimizer_param_names(plain_params) for n in group]
    for name in names:
        for rank_result in results:
            assert_curves_close(rank_result[name], rank_result["plain"], rtol=1e-5)
        assert_params_close(saved_params(os.path.join(root, name)), plain_params, rtol=1e-5)
        common = saved_file(os.path.join(root, name))["optimizer"]
        assert "state" not in common["optimizer"]  # the moments live in distrib_optim.pt only
        sharded = saved_file(os.path.join(root, name), name="distrib_optim.pt")
        for index, param_name in enumerate(plain_names):
            entry = sharded["param_state"][param_name]
            torch.testing.assert_close(entry["param"], plain_params[param_name], rtol=1e-5, atol=1e-7)
            for key in ("exp_avg", "exp_avg_sq"):
                want = plain_optimizer["state"][index][key]
                torch.testing.assert_close(entry[key], want, rtol=1e-5, atol=1e-9, msg=f"{param_name} {key}")


def test_dp2_matches_plain_optimizer_with_dropout(tmp_path):
    """DP 2, dropout on, several padded buckets; with and without --overlap-param-gather."""
    variants = {
        "plain": [],
        "zero": [*ZERO, *SMALL_BUCKETS],
        "zero_overlap": [*ZERO, "--overlap-param-gather"],
    }
    results = run_distributed(_variants, 2, args=(str(tmp_path), variants))
    _check_against_plain(str(tmp_path), results, ["zero", "zero_overlap"])


@pytest.mark.slow
def test_dp4_matches_plain_optimizer_with_dropout(tmp_path):
    variants = {"plain": [], "zero": [*ZERO, *SMALL_BUCKETS]}
    results = run_distributed(_variants, 4, args=(str(tmp_path), variants))
    _check_against_plain(str(tmp_path), results, ["zero"])


# --- collectives ---------------------------------------------------------------------------------------


def _collectives_of_one_step(rank: int, world_size: int, zero: bool) -> tuple[int, dict[str, int]]:
    parallel = initialize_model_parallel(1)
    args = parse_args([*TINY, "--train-iters", "4"], world_size=world_size)
    args.padded_vocab_size = 256
    model_parallel_seed(1, parallel)
    model = GPTModel(transformer_config_from_args(args), parallel)
    randomise_(model, parallel)
    ddp = DistributedDataParallel(model, parallel, bucket_size=3000, use_distributed_optimizer=zero)
    optimizer = build_optimizer(ddp, OptimizerConfig(lr=1e-3, use_distributed_optimizer=zero), parallel)
    assert isinstance(optimizer, DistributedOptimizer) == zero
    tokens = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(rank))
    positions = torch.arange(32).expand(2, 32)
    with count_distributed_calls() as calls:
        optimizer.zero_grad()
        ddp(tokens, positions, labels=tokens).mean().backward()
        ddp.finish_grad_sync()
        assert optimizer.step()[0]
    return len(ddp.buckets), collectives(calls)


@pytest.mark.parametrize("zero", [False, True])
def test_one_step_collectives(zero):
    """Plain: one all-reduce per bucket. ZeRO: one reduce-scatter and one all-gather per bucket, and one
    all-reduce over DP of the gradient norm's partial sums (no gradient all-reduce)."""
    for buckets, calls in run_distributed(_collectives_of_one_step, 2, args=(zero,)):
        assert buckets > 2
        if zero:
            assert calls == {"reduce_scatter_single": buckets, "all_gather_single": buckets, "all_reduce": 1}
        else:
            assert calls == {"all_reduce": buckets}


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
