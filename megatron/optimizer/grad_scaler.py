"""Loss scalers for fp16 training: a constant scale, or Megatron's dynamic scale with hysteresis.

With fp16 the loss is multiplied by a scale S before backward so that small gradients do not underflow;
the optimizer multiplies the fp32 main gradients by 1/S before using them. When any gradient is inf/nan
the step is skipped and the dynamic scaler lowers S.

Dynamic rule (Megatron-LM's DynamicGradScaler), applied after every step:
    overflow:    growth_tracker = 0;  hysteresis_tracker -= 1;
                 if hysteresis_tracker <= 0:  S = max(S * backoff_factor, min_scale)
    no overflow: growth_tracker += 1;
                 if growth_tracker == growth_interval:
                     growth_tracker = 0;  hysteresis_tracker = hysteresis;  S = S * growth_factor
So with hysteresis h the first h-1 overflows (since the last growth) are tolerated without backing off,
and S doubles after `growth_interval` consecutive clean steps.

State dicts use Megatron's keys: {"scale": 1-element float tensor, "growth_tracker", "hysteresis_tracker"}.
"""

from __future__ import annotations

from typing import Any

import torch


class ConstantGradScaler:
    """A fixed loss scale (--loss-scale); overflowing steps are still skipped."""

    def __init__(self, scale: float) -> None:
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        """The scale never changes."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to restore: the scale comes from the configuration."""


class DynamicGradScaler:
    """Megatron's dynamic loss scale: back off by `backoff_factor` on overflow, grow after a clean window."""

    def __init__(
        self,
        initial_scale: float,
        min_scale: float,
        growth_interval: int,
        hysteresis: int,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
    ) -> None:
        if not 0 < min_scale <= initial_scale:
            raise ValueError(
                f"loss scale bounds must satisfy 0 < --min-loss-scale ({min_scale}) <= "
                f"--initial-loss-scale ({initial_scale})"
            )
        self.scale = float(initial_scale)
        self.min_scale = float(min_scale)
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_tracker = 0
        self.hysteresis_tracker = hysteresis

    def update(self, found_inf: bool) -> None:
        """Apply the dynamic rule of the module docstring after one (skipped or taken) step."""
        if found_inf:
            self.growth_tracker = 0
            self.hysteresis_tracker -= 1
            if self.hysteresis_tracker <= 0:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_tracker = self.hysteresis
                self.scale = self.scale * self.growth_factor

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": torch.tensor([self.scale], dtype=torch.float32),
            "growth_tracker": self.growth_tracker,
            "hysteresis_tracker": self.hysteresis_tracker,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scale = float(state_dict["scale"])
        self.growth_tracker = int(state_dict["growth_tracker"])
        self.hysteresis_tracker = int(state_dict["hysteresis_tracker"])
