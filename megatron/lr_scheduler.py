"""Learning-rate and weight-decay schedules (Megatron-LM's OptimizerParamScheduler).

Steps are counted in samples: the training loop calls `step(global_batch_size)` after every iteration.
With n = samples consumed, W = lr_warmup_steps, D = lr_decay_steps:

    warmup (W > 0 and n <= W):   lr = init_lr + (max_lr - init_lr) * n / W
    "constant":                  lr = max_lr
    n > D:                       lr = min_lr
    "inverse-square-root":       lr = max(min_lr, max_lr * sqrt(max(W, 1)) / sqrt(max(n, 1)))
    otherwise, with r = (n - W) / (D - W) in [0, 1]:
        "linear":                lr = min_lr + (max_lr - min_lr) * (1 - r)
        "cosine":                lr = min_lr + (max_lr - min_lr) * 0.5 * (cos(pi * r) + 1)

Weight decay grows from start_wd to end_wd over wd_incr_steps samples (then stays at end_wd), with
s = n / wd_incr_steps:  "constant": end_wd (needs start_wd == end_wd);  "linear": start + (end - start) * s;
"cosine": start + (end - start) * 0.5 * (cos(pi * (1 - s)) + 1).

Every param group gets  group["lr"] = lr  and  group["weight_decay"] = wd * group["wd_mult"].
"""

from __future__ import annotations

import math
from typing import Any

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")
WD_INCR_STYLES = ("constant", "linear", "cosine")


class OptimizerParamScheduler:
    """Set the optimizer's learning rate and weight decay from the number of samples consumed.

    On `load_state_dict`, `use_checkpoint_opt_param_scheduler` takes the schedule from the checkpoint,
    `override_opt_param_scheduler` keeps the one given here, and with neither the two must agree.
    """

    def __init__(
        self,
        optimizer: Any,
        init_lr: float,
        max_lr: float,
        min_lr: float,
        lr_warmup_steps: int,
        lr_decay_steps: int,
        lr_decay_style: str,
        start_wd: float,
        end_wd: float,
        wd_incr_steps: int,
        wd_incr_style: str,
        use_checkpoint_opt_param_scheduler: bool = True,
        override_opt_param_scheduler: bool = False,
    ) -> None:
        if not 0.0 <= min_lr <= max_lr:
            raise ValueError(f"need 0 <= --min-lr ({min_lr}) <= --lr ({max_lr})")
        if init_lr > max_lr:
            raise ValueError(f"the warmup's initial learning rate ({init_lr}) exceeds --lr ({max_lr})")
        if lr_decay_steps <= 0:
            raise ValueError(
                f"the number of learning-rate decay samples must be positive, got {lr_decay_steps}"
            )
        if lr_warmup_steps >= lr_decay_steps:
            raise ValueError(
                f"learning-rate warmup ({lr_warmup_steps} samples) must be shorter than the decay "
                f"({lr_decay_steps} samples)"
            )
        if lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"--lr-decay-style must be one of {LR_DECAY_STYLES}, got {lr_decay_style!r}")
        if not 0.0 <= start_wd <= end_wd:
            raise ValueError(f"need 0 <= --start-weight-decay ({start_wd}) <= --end-weight-decay ({end_wd})")
        if wd_incr_style not in WD_INCR_STYLES:
            raise ValueError(
                f"--weight-decay-incr-style must be one of {WD_INCR_STYLES}, got {wd_incr_style!r}"
            )
        if wd_incr_style == "constant" and start_wd != end_wd:
            raise ValueError(
                f"--weight-decay-incr-style constant needs --start-weight-decay ({start_wd}) == "
                f"--end-weight-decay ({end_wd})"
            )
        if override_opt_param_scheduler and use_checkpoint_opt_param_scheduler:
            raise ValueError(
                "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other"
            )
        self.optimizer = optimizer
        self.init_lr = float(init_lr)
        self.max_lr = float(max_lr)
        self.min_lr = float(min_lr)
        self.lr_warmup_steps = lr_warmup_steps
        self.lr_decay_steps = lr_decay_steps
        self.lr_decay_style = lr_decay_style
        self.start_wd = float(start_wd)
        self.end_wd = float(end_wd)
        self.wd_incr_steps = wd_incr_steps
        self.wd_incr_style = wd_incr_style
        self.use_checkpoint_opt_param_scheduler = use_checkpoint_opt_param_scheduler
        self.override_opt_param_scheduler = override_opt_param_scheduler
        self.num_steps = 0
        self.step(0)

    def get_wd(self) -> float:
        """The weight decay after `num_steps` samples (module docstring)."""
        if self.num_steps > self.wd_incr_steps or self.wd_incr_style == "constant":
            return self.end_wd
        incr_ratio = self.num_steps / self.wd_incr_steps
        if self.wd_incr_style == "linear":
            coeff = incr_ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * (1.0 - incr_ratio)) + 1.0)
        return self.start_wd + coeff * (self.end_wd - self.start_wd)

    def get_lr(self) -> float:
        """The learning rate after `num_steps` samples (module docstring)."""
        if self.lr_warmup_steps > 0 and self.num_steps <= self.lr_warmup_steps:
            return self.init_lr + (self.max_lr - self.init_lr) * self.num_steps / self.lr_warmup_steps
        if self.lr_decay_style == "constant":
            return self.max_lr
        if self.num_steps > self.lr_decay_steps:
            return self.min_lr
        if self.lr_decay_style == "inverse-square-root":
            warmup_steps = max(self.lr_warmup_steps, 1)
            num_steps = max(self.num_steps, 1)
            return max(self.min_lr, self.max_lr * warmup_steps**0.5 / num_steps**0.5)
        decay_ratio = (self.num_steps - self.lr_warmup_steps) / (self.lr_decay_steps - self.lr_warmup_steps)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - decay_ratio
        else:
            coeff = 0.5 * (math.cos(math.pi * decay_ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment: int) -> None:
        """Advance by `increment` samples and write lr and weight decay into every param group."""
        self.num_steps += increment
        lr, wd = self.get_lr(), self.get_wd()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd * group["wd_mult"]

    def state_dict(self) -> dict[str, Any]:
        """Megatron's keys: the schedule's settings and num_steps (samples consumed)."""
        return {
            "max_lr": self.max_lr,
            "lr_warmup_steps": self.lr_warmup_steps,
            "num_steps": self.num_steps,
            "lr_decay_style": self.lr_decay_style,
            "lr_decay_steps": self.lr_decay_steps,
            "min_lr": self.min_lr,
            "start_wd": self.start_wd,
            "end_wd": self.end_wd,
            "wd_incr_style": self.wd_incr_style,
            "wd_incr_steps": self.wd_incr_steps,
        }

    def _check_and_set(self, current: Any, saved: Any, name: str) -> Any:
        """The value to use after loading: ours when overriding, else the checkpoint's (checked if needed)."""
        if self.override_opt_param_scheduler:
            return current
        if not self.use_checkpoint_opt_param_scheduler and current != saved:
            raise ValueError(
                f"OptimizerParamScheduler: {name} is {current} but the checkpoint has {saved}; pass "
                "--use-checkpoint-opt_param-scheduler or --override-opt_param-scheduler"
            )
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position (and, per the flags, the settings); also reads Megatron's older key names."""

        def saved(*keys: str) -> Any:
            for key in keys:
                if key in state_dict:
                    return state_dict[key]
            raise ValueError(f"opt_param_scheduler state has none of the keys {keys}")

        self.max_lr = self._check_and_set(self.max_lr, saved("max_lr", "start_lr"), "learning rate")
        self.min_lr = self._check_and_set(self.min_lr, saved("min_lr"), "minimum learning rate")
        self.lr_warmup_steps = self._check_and_set(
            self.lr_warmup_steps, saved("lr_warmup_steps", "warmup_steps", "warmup_iter"), "warmup steps"
        )
        self.lr_decay_steps = self._check_and_set(
            self.lr_decay_steps, saved("lr_decay_steps", "decay_steps", "end_iter"), "decay steps"
        )
        self.lr_decay_style = self._check_and_set(
            self.lr_decay_style, saved("lr_decay_style", "decay_style"), "learning rate decay style"
        )
        if "start_wd" in state_dict:
            self.start_wd = self._check_and_set(self.start_wd, state_dict["start_wd"], "start weight decay")
            self.end_wd = self._check_and_set(self.end_wd, state_dict["end_wd"], "end weight decay")
            self.wd_incr_steps = self._check_and_set(
                self.wd_incr_steps, state_dict["wd_incr_steps"], "weight decay increment steps"
            )
            self.wd_incr_style = self._check_and_set(
                self.wd_incr_style, state_dict["wd_incr_style"], "weight decay increment style"
            )
        self.num_steps = 0
        self.step(saved("num_steps", "num_iters"))
