"""The optimizer's configuration: one typed object, built from the parsed arguments and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class OptimizerConfig:
    """Optimizer, mixed precision and clipping settings (field names follow Megatron-LM's arguments).

    optimizer: "adam" (Adam with decoupled weight decay, i.e. AdamW, as Megatron) or "sgd" (with momentum;
        its weight decay is the classic L2 term added to the gradient).
    lr, weight_decay: initial values; the OptimizerParamScheduler overwrites them every step.
    clip_grad: maximum global L2 norm of the gradients; 0 disables clipping.
    fp16 / bf16: the model parameters are half precision; the optimizer keeps fp32 main copies.
    loss_scale: a constant loss scale for fp16; None selects the dynamic scaler, which starts at
        initial_loss_scale, halves on overflow (after `hysteresis` overflows), never goes below
        min_loss_scale, and doubles after `loss_scale_window` steps without overflow.
    """

    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.9
    clip_grad: float = 1.0
    fp16: bool = False
    bf16: bool = False
    loss_scale: Optional[float] = None
    initial_loss_scale: float = 2**32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2
    log_num_zeros_in_grad: bool = False  # count the zero gradient elements in step() (costs a pass)

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"--optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.fp16 and self.bf16:
            raise ValueError("--fp16 and --bf16 are mutually exclusive")
        if self.clip_grad < 0:
            raise ValueError(f"--clip-grad must be >= 0 (0 disables clipping), got {self.clip_grad}")
        if self.loss_scale is not None and self.loss_scale <= 0:
            raise ValueError(f"--loss-scale must be positive, got {self.loss_scale}")
        if self.hysteresis < 1 or self.loss_scale_window < 1:
            raise ValueError(
                f"--hysteresis ({self.hysteresis}) and --loss-scale-window ({self.loss_scale_window}) must be >= 1"
            )
