"""Megatron's optimizer wrapper: fp32 main weights for half-precision models, loss scaling, clipping.

The model is wrapped in megatron.distributed.DistributedDataParallel, so after backward every parameter
p has `p.main_grad`: its fp32 gradient, summed over microbatches and averaged over the DP group. One
`step()` then does

    1. fp16 only: g <- g / S for every main_grad g (S = current loss scale)
    2. ||g|| (global L2 norm over TP x PP, duplicates counted once) and found_inf (any inf/nan)
    3. fp16 only: update the loss scale (see grad_scaler.py)
    4. found_inf: skip the update, return (False, None, 0)      -- for bf16/fp32 this is a "nan iteration"
    5. clip_grad > 0 and ||g|| > clip_grad: g <- g * clip_grad / (||g|| + 1e-6)
    6. the torch optimizer (AdamW or SGD) updates the main params with grad = main_grad
    7. fp16/bf16: copy the fp32 main params back into the half-precision model params (rounding)

Main params: a half-precision (fp16/bf16) model parameter gets an fp32 copy that the optimizer owns and
updates, so updates smaller than half precision's resolution are not lost; an fp32 model parameter is
its own main param. The torch optimizer runs with fused=True where torch has fused kernels (CPU, CUDA;
about 4x faster than foreach on CPU), foreach otherwise.

State dict (Megatron-LM's layout): for fp32 training the torch optimizer's own state dict; for fp16/bf16
{"optimizer": torch optimizer state dict, "fp32_from_fp16_params": [[fp32 main copy of each half-precision
param] per param group], "grad_scaler": scaler state (fp16 only)}.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from megatron.distributed import DistributedDataParallel
from megatron.optimizer.clip_grads import clip_grads_, count_zeros, grad_norm_and_found_inf, l2_norm
from megatron.optimizer.config import OptimizerConfig
from megatron.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron.parallel.layers import param_is_not_tensor_parallel_duplicate
from megatron.parallel.state import ParallelState

GradScaler = Union[ConstantGradScaler, DynamicGradScaler]
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def get_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Split the trainable parameters into a decayed group and a non-decayed group.

    Biases and other 1-D parameters (layernorm weights and biases) get no weight decay, as in Megatron:
    returns [{"params": [...], "wd_mult": 1.0}, {"params": [...], "wd_mult": 0.0}] in the order of
    model.named_parameters(), leaving out a group that would be empty.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias") or param.dim() == 1:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "wd_mult": 1.0}, {"params": no_decay, "wd_mult": 0.0}]
    return [group for group in groups if group["params"]]


def _torch_optimizer(groups: list[dict[str, Any]], config: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over `groups`, fused where torch has fused kernels for the parameters' device."""
    device = groups[0]["params"][0].device
    kernel = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}
    if config.optimizer == "adam":
        return torch.optim.AdamW(
            groups,
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            **kernel,
        )
    return torch.optim.SGD(
        groups, lr=config.lr, momentum=config.sgd_momentum, weight_decay=config.weight_decay, **kernel
    )


def _build_grad_scaler(config: OptimizerConfig) -> Optional[GradScaler]:
    if not config.fp16:
        return None
    if config.loss_scale is not None:
        return ConstantGradScaler(config.loss_scale)
    return DynamicGradScaler(
        initial_scale=config.initial_loss_scale,
        min_scale=config.min_loss_scale,
        growth_interval=config.loss_scale_window,
        hysteresis=config.hysteresis,
    )


class MegatronOptimizer:
    """The optimizer step of one rank: see the module docstring for the sequence of operations."""

    sharded_over_dp = False  # the distributed optimizer steps a DP shard of the gradient

    def __init__(
        self, model: DistributedDataParallel, config: OptimizerConfig, parallel: ParallelState
    ) -> None:
        self.model = model
        self.config = config
        self.parallel = parallel
        self.mixed_precision = config.fp16 or config.bf16
        self.grad_scaler = _build_grad_scaler(config)

        self._model_params: list[nn.Parameter] = []  # every trainable parameter, in param-group order
        self._main_params: list[Tensor] = []  # the tensor the torch optimizer updates for each of them
        self._half_params: list[nn.Parameter] = []  # the half-precision model params ...
        self._half_mains: list[Tensor] = []  # ... and their fp32 copies
        self._main_copies: list[list[Tensor]] = []  # the same fp32 copies, per param group (state dict)
        torch_groups = []
        for group in get_param_groups(model.module):
            group_mains, group_copies = [], []
            for param in group["params"]:
                if not hasattr(param, "main_grad"):
                    raise ValueError(
                        "a parameter has no main_grad: wrap the model in DistributedDataParallel first"
                    )
                if param.dtype in _HALF_DTYPES:
                    if not self.mixed_precision:
                        raise ValueError(f"the model has {param.dtype} parameters: set --fp16 or --bf16")
                    main = param.detach().clone().float()
                    self._half_params.append(param)
                    self._half_mains.append(main)
                    group_copies.append(main)
                else:
                    main = param
                self._model_params.append(param)
                group_mains.append(main)
            self._main_params.extend(group_mains)
            self._main_copies.append(group_copies)
            torch_groups.append(
                {
                    "params": group_mains,
                    "wd_mult": group["wd_mult"],
                    "weight_decay": config.weight_decay * group["wd_mult"],
                }
            )
        if not torch_groups:
            raise ValueError("the model has no trainable parameters")
        self._counted_in_norm = [
            param_is_not_tensor_parallel_duplicate(p, parallel) and not getattr(p, "shared", False)
            for p in self._model_params
        ]
        self.optimizer = _torch_optimizer(torch_groups, config)

    def main_params_by_name(self) -> list[tuple[str, Tensor]]:
        """(model parameter name, the fp32 tensor the torch optimizer updates for it) in optimizer order."""
        names = {param: name for name, param in self.model.module.named_parameters()}
        return [(names[param], main) for param, main in zip(self._model_params, self._main_params)]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The torch optimizer's groups; the scheduler sets "lr" and "weight_decay" (= wd * "wd_mult")."""
        return self.optimizer.param_groups

    @property
    def loss_scale(self) -> float:
        """The current fp16 loss scale S; 1.0 for bf16 and fp32."""
        return self.grad_scaler.scale if self.grad_scaler is not None else 1.0

    def scale_loss(self, loss: Tensor) -> Tensor:
        """loss * S, the quantity to call backward on (fp16); the loss itself otherwise."""
        return loss * self.grad_scaler.scale if self.grad_scaler is not None else loss

    @torch.no_grad()
    def step(self) -> tuple[bool, Optional[float], int]:
        """Unscale, check, clip and apply the main gradients; return (update_successful, grad_norm, num_zeros).

        grad_norm is the global L2 norm of the (unscaled) gradients before clipping, None when the step is
        skipped because a gradient is inf/nan. num_zeros is Megatron's num_zeros_in_grad (zero elements of
        the clipped gradients over the model, see clip_grads.count_zeros) with config.log_num_zeros_in_grad,
        else 0 (not counted).
        """
        grads = self._main_grads()
        if self.grad_scaler is not None:
            torch._foreach_mul_(grads, 1.0 / self.grad_scaler.scale)
        grad_norm, found_inf = grad_norm_and_found_inf(
            grads, self._counted_in_norm, self.parallel, self.sharded_over_dp
        )
        if self.grad_scaler is not None:
            self.grad_scaler.update(found_inf)
        if found_inf:
            return False, None, 0
        if self.config.clip_grad > 0:
            clip_grads_(grads, self.config.clip_grad, grad_norm)
        num_zeros = (
            count_zeros(grads, self._counted_in_norm, self.parallel, self.sharded_over_dp)
            if self.config.log_num_zeros_in_grad
            else 0
        )

        for main, grad in zip(self._main_params, grads):
            main.grad = grad
        self.optimizer.step()
        # Drop the aliases of the gradient buffer: a .grad left on a model param would be accumulated into.
        for main in self._main_params:
            main.grad = None
        self._update_model_params()
        return True, grad_norm, num_zeros

    def _main_grads(self) -> list[Tensor]:
        """The fp32 gradient of each main param, in the order of self._main_params."""
        return [param.main_grad for param in self._model_params]

    def _update_model_params(self) -> None:
        """Copy the updated fp32 main params into the half-precision model params (rounding)."""
        if self._half_params:
            torch._foreach_copy_(self._half_params, self._half_mains)

    @torch.no_grad()
    def params_norm(self) -> float:
        """L2 norm of the whole model's fp32 main parameters (TP duplicates counted once), for --log-params-norm."""
        return l2_norm(self._main_params, self._counted_in_norm, self.parallel, self.sharded_over_dp)

    def zero_grad(self) -> None:
        """Zero the gradient buffer (every main_grad) and drop any .grad; call before each iteration."""
        self.model.zero_grad_buffer()
        for main in self._main_params:
            main.grad = None

    @torch.no_grad()
    def reload_model_params(self) -> None:
        """Refresh the fp32 main copies from the model params (after loading a model without optimizer)."""
        if self._half_params:
            torch._foreach_copy_(self._half_mains, self._half_params)

    def state_dict(self) -> dict[str, Any]:
        """Megatron's layout: see the module docstring."""
        if not self.mixed_precision:
            return self.optimizer.state_dict()
        state = {"optimizer": self.optimizer.state_dict(), "fp32_from_fp16_params": self._main_copies}
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state dict written by `state_dict()` (or by Megatron-LM for the same model)."""
        if not self.mixed_precision:
            self.optimizer.load_state_dict(state_dict)
            return
        if "optimizer" not in state_dict or "fp32_from_fp16_params" not in state_dict:
            raise ValueError(
                "optimizer state has no 'optimizer'/'fp32_from_fp16_params' entries: it was not saved by an "
                "fp16/bf16 run"
            )
        self.optimizer.load_state_dict(state_dict["optimizer"])
        saved_groups = state_dict["fp32_from_fp16_params"]
        shapes = [[tuple(t.shape) for t in group] for group in self._main_copies]
        saved_shapes = [[tuple(t.shape) for t in group] for group in saved_groups]
        if shapes != saved_shapes:
            raise ValueError(
                f"fp32_from_fp16_params in the checkpoint have shapes {saved_shapes}, the model needs {shapes}"
            )
        for group, saved_group in zip(self._main_copies, saved_groups):
            for main, saved in zip(group, saved_group):
                main.copy_(saved)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


def build_optimizer(
    model: DistributedDataParallel, config: OptimizerConfig, parallel: ParallelState
) -> MegatronOptimizer:
    """The optimizer for `model` (already wrapped in DistributedDataParallel) under `config`: the
    distributed optimizer (megatron/optimizer/distrib_optim.py) with config.use_distributed_optimizer."""
    if config.use_distributed_optimizer:
        from megatron.optimizer.distrib_optim import DistributedOptimizer  # it builds on this module

        return DistributedOptimizer(model, config, parallel)
    return MegatronOptimizer(model, config, parallel)
