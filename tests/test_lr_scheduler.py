"""OptimizerParamScheduler: Megatron's warmup and decay formulas, weight-decay increments, state dicts."""

import math
from types import SimpleNamespace

import pytest

from megatron.lr_scheduler import OptimizerParamScheduler


def fake_optimizer() -> SimpleNamespace:
    return SimpleNamespace(param_groups=[{"wd_mult": 1.0}, {"wd_mult": 0.0}])


def scheduler(**overrides: object) -> OptimizerParamScheduler:
    kwargs = dict(
        optimizer=fake_optimizer(),
        init_lr=0.0,
        max_lr=1.0,
        min_lr=0.1,
        lr_warmup_steps=100,
        lr_decay_steps=1100,
        lr_decay_style="linear",
        start_wd=0.1,
        end_wd=0.1,
        wd_incr_steps=1000,
        wd_incr_style="constant",
    )
    kwargs.update(overrides)
    return OptimizerParamScheduler(**kwargs)


def lr_at(sched: OptimizerParamScheduler, samples: int) -> float:
    sched.step(samples - sched.num_steps)
    return sched.get_lr()


@pytest.mark.parametrize(
    "style,samples,expected",
    [
        ("linear", 0, 0.0),
        ("linear", 50, 0.5),  # warmup: init + (max - init) * 50 / 100
        ("linear", 100, 1.0),
        ("linear", 600, 0.55),  # halfway through decay: 0.1 + 0.9 * 0.5
        ("linear", 1100, 0.1),
        ("linear", 5000, 0.1),  # past the decay: min_lr
        ("cosine", 100, 1.0),
        ("cosine", 350, 0.1 + 0.9 * 0.5 * (math.cos(math.pi * 0.25) + 1)),
        ("cosine", 600, 0.55),
        ("cosine", 1100, 0.1),
        ("constant", 50, 0.5),  # warmup applies to every style
        ("constant", 600, 1.0),
        ("constant", 5000, 1.0),  # constant ignores min_lr even after the decay
        ("inverse-square-root", 100, 1.0),
        ("inverse-square-root", 400, 0.5),  # max_lr * sqrt(100) / sqrt(400)
        ("inverse-square-root", 10000, 0.1),  # past the decay: min_lr
    ],
)
def test_lr_values_at_known_steps(style: str, samples: int, expected: float) -> None:
    assert lr_at(scheduler(lr_decay_style=style), samples) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_inverse_square_root_floor_and_no_warmup() -> None:
    sched = scheduler(
        lr_decay_style="inverse-square-root", lr_warmup_steps=0, min_lr=0.3, lr_decay_steps=10**6
    )
    assert lr_at(sched, 0) == 1.0  # max(n, 1) avoids dividing by zero
    assert lr_at(sched, 4) == 0.5
    assert lr_at(sched, 100) == 0.3  # 0.1 would be below min_lr


def test_warmup_from_nonzero_init_lr() -> None:
    sched = scheduler(init_lr=0.2)
    assert lr_at(sched, 0) == pytest.approx(0.2)
    assert lr_at(sched, 25) == pytest.approx(0.2 + 0.8 * 0.25)


def test_step_sets_lr_and_weight_decay_times_wd_mult_in_every_group() -> None:
    sched = scheduler(start_wd=0.0, end_wd=0.2, wd_incr_style="linear")
    sched.step(64)
    sched.step(186)  # steps count samples: 250 in all
    groups = sched.optimizer.param_groups
    assert groups[0]["lr"] == groups[1]["lr"] == pytest.approx(0.1 + 0.9 * (1 - 150 / 1000))
    assert groups[0]["weight_decay"] == pytest.approx(0.2 * 250 / 1000)
    assert groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize(
    "style,samples,expected",
    [
        ("linear", 250, 0.01 + 0.04 * 0.25),
        ("cosine", 250, 0.01 + 0.04 * 0.5 * (math.cos(math.pi * 0.75) + 1)),
        ("cosine", 500, 0.03),
        ("linear", 1000, 0.05),
        ("linear", 2000, 0.05),  # after wd_incr_steps: end_wd
    ],
)
def test_weight_decay_increment(style: str, samples: int, expected: float) -> None:
    sched = scheduler(start_wd=0.01, end_wd=0.05, wd_incr_style=style)
    sched.step(samples)
    assert sched.get_wd() == pytest.approx(expected, rel=1e-12)


def test_state_dict_round_trip_resumes_the_schedule() -> None:
    sched = scheduler(lr_decay_style="cosine", start_wd=0.0, end_wd=0.1, wd_incr_style="linear")
    sched.step(432)
    state = sched.state_dict()
    assert state["num_steps"] == 432 and state["lr_decay_style"] == "cosine"
    resumed = scheduler(lr_decay_style="cosine", start_wd=0.0, end_wd=0.1, wd_incr_style="linear")
    resumed.load_state_dict(state)
    assert resumed.num_steps == 432
    assert resumed.get_lr() == sched.get_lr() and resumed.get_wd() == sched.get_wd()
    assert resumed.optimizer.param_groups[0]["lr"] == sched.get_lr()


def test_load_uses_checkpoint_values_or_overrides_them() -> None:
    state = scheduler(max_lr=2.0, lr_decay_style="cosine").state_dict()
    from_checkpoint = scheduler()
    from_checkpoint.load_state_dict(state)
    assert (from_checkpoint.max_lr, from_checkpoint.lr_decay_style) == (2.0, "cosine")

    overriding = scheduler(override_opt_param_scheduler=True, use_checkpoint_opt_param_scheduler=False)
    overriding.load_state_dict(state)
    assert (overriding.max_lr, overriding.lr_decay_style) == (1.0, "linear")

    strict = scheduler(use_checkpoint_opt_param_scheduler=False)
    with pytest.raises(ValueError, match="learning rate is 1.0 but the checkpoint has 2.0"):
        strict.load_state_dict(state)


def test_load_reads_megatron_legacy_keys() -> None:
    legacy = {
        "start_lr": 1.0,
        "min_lr": 0.1,
        "warmup_iter": 100,
        "end_iter": 1100,
        "decay_style": "linear",
        "num_iters": 600,
    }
    sched = scheduler()
    sched.load_state_dict(legacy)
    assert sched.num_steps == 600 and sched.get_lr() == pytest.approx(0.55)


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"lr_decay_style": "exponential"}, "--lr-decay-style"),
        ({"min_lr": 2.0}, "--min-lr"),
        ({"lr_warmup_steps": 1100}, "warmup"),
        ({"lr_decay_steps": 0}, "decay samples must be positive"),
        ({"start_wd": 0.1, "end_wd": 0.2}, "constant needs"),
        ({"override_opt_param_scheduler": True}, "exclude each other"),
    ],
)
def test_invalid_settings_are_rejected_with_the_flag_named(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        scheduler(**overrides)
