"""The distributed optimizer (ZeRO stage 1, Megatron-LM's --use-distributed-optimizer).

megatron.distributed.DistributedDataParallel(use_distributed_optimizer=True) pads every gradient bucket to
a multiple of the DP size D, cuts it into D contiguous shards ignoring parameter boundaries, and
reduce-scatters it, so that DP rank r holds the DP-averaged gradient of its shard [r S, (r + 1) S) of
every bucket. This optimizer owns exactly those elements: for each parameter p overlapping the shard, a
"piece" p.view(-1)[lo:hi], with

    main piece   fp32 master weights of the piece (a view of p itself for fp32 models, a copy otherwise)
    grad piece   p.main_grad.view(-1)[lo:hi], the reduce-scattered gradient
    Adam state   exp_avg, exp_avg_sq of the piece only (what the torch optimizer allocates for the piece)

so the optimizer memory per rank is 12 bytes x (parameters / D) instead of 12 bytes x parameters. One
step runs the sequence of MegatronOptimizer.step on the pieces; the gradient norm and the inf/nan count
are summed over the DP group as well as the model-parallel groups (clip_grads.norm_reduction_groups), so
clipping and skipping see the whole gradient, each element counted once. The updated pieces are written
into the model's parameter buffer (rounded to bf16/fp16) and all-gathered over DP
(DistributedDataParallel.start_param_gather). Elementwise, the update is exactly the unsharded one.

Checkpoint (independent of D). `state_dict()` (stored in model_optim_rng.pt as "optimizer") holds what
every rank shares: the torch param groups' hyperparameters without their parameter lists, and the loss
scaler. `sharded_state_dict()` is collective over the DP group: it all-gathers the shards and returns, on
every rank, for each parameter name of the model state dict {"param": fp32 master weight, "exp_avg",
"exp_avg_sq"} shaped like the parameter, plus Adam's "step" count; DP rank 0 of each TP rank writes it
to mp_rank_TT[_PPP]/distrib_optim.pt beside model_optim_rng.pt. Because it is keyed by parameter and shaped
like the parameters it can be loaded at any DP size, by the plain optimizer too, and resharded over TP
like the weights (tools/checkpoint).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron.checkpoint_format import CheckpointError
from megatron.distributed import DistributedDataParallel
from megatron.optimizer.config import OptimizerConfig
from megatron.optimizer.optimizer import (
    MegatronOptimizer,
    _build_grad_scaler,
    _torch_optimizer,
    get_param_groups,
)
from megatron.parallel.collectives import all_gather_into, all_reduce
from megatron.parallel.layers import param_is_not_tensor_parallel_duplicate
from megatron.parallel.state import ParallelState

DISTRIB_OPTIM_FILENAME = "distrib_optim.pt"
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")
_HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class _Piece:
    """The elements [start, end) of param.view(-1) that this DP rank owns; `shard_offset` is where
    element `start` sits inside this rank's shard of bucket number `bucket`."""

    name: str
    param: nn.Parameter
    start: int
    end: int
    bucket: int
    shard_offset: int

    def model_view(self) -> Tensor:
        return self.param.detach().view(-1)[self.start : self.end]

    def grad_view(self) -> Tensor:
        return self.param.main_grad.view(-1)[self.start : self.end]


def _owned_pieces(model: DistributedDataParallel, parallel: ParallelState) -> list[_Piece]:
    """The intersections of this rank's shard of every bucket with the parameters in it."""
    names = {param: name for name, param in model.module.named_parameters()}
    pieces = []
    for index, bucket in enumerate(model.buckets):
        shard_start, shard_end = bucket.shard_range(parallel)
        for param, offset in zip(bucket.params, bucket.offsets):
            lo, hi = max(shard_start, offset), min(shard_end, offset + param.numel())
            if lo < hi:
                pieces.append(_Piece(names[param], param, lo - offset, hi - offset, index, lo - shard_start))
    return pieces


class DistributedOptimizer(MegatronOptimizer):
    """MegatronOptimizer over this DP rank's shard of the parameters (see the module docstring)."""

    sharded_over_dp = True

    def __init__(
        self, model: DistributedDataParallel, config: OptimizerConfig, parallel: ParallelState
    ) -> None:
        if not model.use_distributed_optimizer:
            raise ValueError("wrap the model in DistributedDataParallel(use_distributed_optimizer=True)")
        self.model = model
        self.config = config
        self.parallel = parallel
        self.mixed_precision = config.fp16 or config.bf16
        self.grad_scaler = _build_grad_scaler(config)
        groups = get_param_groups(model.module)
        if not groups:
            raise ValueError("the model has no trainable parameters")
        group_of = {param: i for i, group in enumerate(groups) for param in group["params"]}
        by_group: list[list[_Piece]] = [[] for _ in groups]
        for piece in _owned_pieces(model, parallel):
            if piece.param.dtype in _HALF_DTYPES and not self.mixed_precision:
                raise ValueError(f"the model has {piece.param.dtype} parameters: set --fp16 or --bf16")
            by_group[group_of[piece.param]].append(piece)
        self._pieces = [piece for group in by_group for piece in group]  # torch optimizer index order

        self._main_params: list[Tensor] = []
        self._half_params: list[Tensor] = []  # model views of the half-precision pieces ...
        self._half_mains: list[Tensor] = []  # ... and their fp32 masters
        for piece in self._pieces:
            view = piece.model_view()
            if view.dtype in _HALF_DTYPES:
                main = view.clone().float()
                self._half_params.append(view)
                self._half_mains.append(main)
            else:
                main = view
            self._main_params.append(main)
        self._counted_in_norm = [  # the last stage's copy of a tied embedding is counted on the first stage
            param_is_not_tensor_parallel_duplicate(p.param, parallel)
            and not getattr(p.param, "shared", False)
            for p in self._pieces
        ]
        mains = iter(self._main_params)
        torch_groups = [
            {
                "params": [next(mains) for _ in pieces],
                "wd_mult": group["wd_mult"],
                "weight_decay": config.weight_decay * group["wd_mult"],
            }
            for group, pieces in zip(groups, by_group)
        ]
        self.optimizer = _torch_optimizer(torch_groups, config)

    def _main_grads(self) -> list[Tensor]:
        return [piece.grad_view() for piece in self._pieces]

    @torch.no_grad()
    def step(self) -> tuple[bool, Optional[float], int]:
        """MegatronOptimizer.step on this rank's shard, then the all-gather of the updated parameters."""
        self.model.finish_param_gather()  # the shard about to be updated must not be in flight
        return super().step()

    def _update_model_params(self) -> None:
        super()._update_model_params()
        self.model.start_param_gather()

    # ------------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """What all DP ranks share: param-group hyperparameters (no parameter lists) and the loss scaler."""
        groups = [
            {k: v for k, v in g.items() if k != "params"} for g in self.optimizer.state_dict()["param_groups"]
        ]
        state: dict[str, Any] = {
            "optimizer": {"param_groups": groups},
            "sharded_state": DISTRIB_OPTIM_FILENAME,
        }
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what state_dict() saved; the sharded state comes from load_sharded_state_dict()."""
        if "optimizer" not in state_dict or "param_groups" not in state_dict["optimizer"]:
            raise ValueError("optimizer state has no 'optimizer.param_groups' entry")
        _restore_hyperparameters(self.optimizer, state_dict["optimizer"]["param_groups"])
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])

    @torch.no_grad()
    def sharded_state_dict(self) -> dict[str, Any]:
        """Collective over DP: every parameter's fp32 master weight and Adam moments, whole (module docstring)."""
        self.model.finish_param_gather()
        keys = ("param", *ADAM_STATE_KEYS)
        buckets = self.model.buckets
        device = self.model.grad_buffer.device
        shard_sizes = [bucket.data.numel() // self.parallel.dp_size for bucket in buckets]
        shards = {
            key: [torch.zeros(n, dtype=torch.float32, device=device) for n in shard_sizes] for key in keys
        }
        step = torch.zeros((), dtype=torch.float32, device=device)
        for piece, main in zip(self._pieces, self._main_params):
            state = self.optimizer.state.get(main, {})
            where = slice(piece.shard_offset, piece.shard_offset + piece.end - piece.start)
            for key in keys:
                value = main if key == "param" else state.get(key)
                if value is not None:
                    shards[key][piece.bucket][where] = value
            if "step" in state:
                step = state["step"].detach().float().to(device)
        names = {param: name for name, param in self.model.module.named_parameters()}
        per_name: dict[str, dict[str, Tensor]] = {}
        for index, bucket in enumerate(buckets):
            whole = {key: _all_gather_over_dp(shards[key][index], self.parallel) for key in keys}
            for param, offset in zip(bucket.params, bucket.offsets):
                per_name[names[param]] = {
                    key: whole[key][offset : offset + param.numel()].view(param.shape).cpu().clone()
                    for key in keys
                }
        # A rank whose shard holds only padding has no step count of its own: take the largest.
        step = all_reduce(step.clone(), self.parallel.dp_group, dist.ReduceOp.MAX).cpu()
        return {"optimizer": self.config.optimizer, "step": step, "param_state": per_name}

    @torch.no_grad()
    def load_sharded_state_dict(self, sharded: dict[str, Any]) -> None:
        """Take this rank's pieces of the whole per-parameter state written by sharded_state_dict().

        The model weights are loaded separately (model_optim_rng.pt holds them, rounded from these masters)."""
        param_state = sharded["param_state"]
        for piece, main in zip(self._pieces, self._main_params):
            entry = param_state[piece.name]
            main.copy_(entry["param"].reshape(-1)[piece.start : piece.end])
            self.optimizer.state[main] = {
                "step": sharded["step"].clone().to(main.device),
                **{
                    key: entry[key].reshape(-1)[piece.start : piece.end].clone().to(main.device)
                    for key in ADAM_STATE_KEYS
                },
            }


def _all_gather_over_dp(shard: Tensor, parallel: ParallelState) -> Tensor:
    """concat over DP ranks r of rank r's `shard` (all-gather; the shard itself when D = 1)."""
    if parallel.dp_group is None:
        return shard
    whole = torch.empty(shard.numel() * parallel.dp_size, dtype=shard.dtype, device=shard.device)
    all_gather_into(whole, shard.contiguous(), parallel.dp_group)
    return whole


def _restore_hyperparameters(optimizer: torch.optim.Optimizer, saved_groups: list[dict[str, Any]]) -> None:
    """Copy the saved groups' hyperparameters (lr, betas, weight decay, ...) onto the current groups."""
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"the checkpoint has {len(saved_groups)} optimizer param groups, this model {len(optimizer.param_groups)}"
        )
    for group, saved in zip(optimizer.param_groups, saved_groups):
        group.update({k: v for k, v in saved.items() if k != "params"})


# ------------------------------------------------------------------------------------ checkpoint files


def sharded_optimizer_state(optimizer: Any) -> Optional[dict[str, Any]]:
    """Collective over DP: the content of distrib_optim.pt for a DistributedOptimizer, None for any other."""
    return optimizer.sharded_state_dict() if isinstance(optimizer, DistributedOptimizer) else None


def load_optimizer_state(optimizer: MegatronOptimizer, common: dict[str, Any], shard_dir: str) -> None:
    """Restore `optimizer` from a checkpoint's "optimizer" entry and, when the checkpoint was saved by the
    distributed optimizer, from `<shard_dir>/distrib_optim.pt` (at any DP size, with or without
    --use-distributed-optimizer). A plain checkpoint restores a DistributedOptimizer as well. Raises
    CheckpointError naming the file when distrib_optim.pt is missing or does not fit this run."""
    distributed = isinstance(optimizer, DistributedOptimizer)
    if "sharded_state" not in common:
        if not distributed:
            optimizer.load_state_dict(common)
            return
        common, sharded = _from_plain(optimizer, common)
    else:
        path = os.path.join(shard_dir, DISTRIB_OPTIM_FILENAME)
        sharded = _read_sharded_file(path)
        if sharded.get("optimizer") != optimizer.config.optimizer:
            raise CheckpointError(
                f"{path} holds {sharded.get('optimizer')} state but this run uses --optimizer "
                f"{optimizer.config.optimizer}: use the checkpoint's optimizer, or load with --no-load-optim"
            )
        _check_params(optimizer, sharded["param_state"], path)
    if distributed:
        optimizer.load_state_dict(common)
        optimizer.load_sharded_state_dict(sharded)
    else:
        _load_into_plain(optimizer, common, sharded)


def _read_sharded_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise CheckpointError(
            f"{path} not found: this checkpoint was saved with --use-distributed-optimizer, whose optimizer "
            "state lives in that file; restore it, or load with --no-load-optim (weights only, fresh optimizer)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: name it
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e


def _check_params(optimizer: MegatronOptimizer, param_state: dict[str, Any], path: str) -> None:
    """CheckpointError unless `param_state` has one entry of the right shape per trainable parameter."""
    shapes = {n: tuple(p.shape) for n, p in optimizer.model.module.named_parameters() if p.requires_grad}
    saved = {n: tuple(entry["param"].shape) for n, entry in param_state.items()}
    if shapes != saved:
        differ = sorted(n for n in shapes.keys() | saved.keys() if shapes.get(n) != saved.get(n))
        raise CheckpointError(
            f"{path} does not match the model: parameters {differ[:5]} differ (checkpoint "
            f"{[saved.get(n) for n in differ[:5]]}, model {[shapes.get(n) for n in differ[:5]]})"
        )


@torch.no_grad()
def _load_into_plain(optimizer: MegatronOptimizer, common: dict[str, Any], sharded: dict[str, Any]) -> None:
    """The unsharded optimizer takes every parameter's master weight and Adam moments whole."""
    _restore_hyperparameters(optimizer.optimizer, common["optimizer"]["param_groups"])
    for name, main in optimizer.main_params_by_name():
        entry = sharded["param_state"][name]
        main.copy_(entry["param"])
        optimizer.optimizer.state[main] = {
            "step": sharded["step"].clone().to(main.device),
            **{key: entry[key].clone().to(main.device) for key in ADAM_STATE_KEYS},
        }
    if optimizer.grad_scaler is not None and "grad_scaler" in common:
        optimizer.grad_scaler.load_state_dict(common["grad_scaler"])


def _from_plain(optimizer: DistributedOptimizer, common: dict[str, Any]) -> tuple[dict, dict]:
    """(common, sharded) state of a distributed optimizer from an unsharded optimizer's state dict
    (megatron/optimizer/optimizer.py: parameters indexed in get_param_groups order)."""
    module = optimizer.model.module
    names = {param: name for name, param in module.named_parameters()}
    ordered = [param for group in get_param_groups(module) for param in group["params"]]
    torch_state = common["optimizer"] if optimizer.mixed_precision else common
    if optimizer.mixed_precision:
        mains = [t for group in common["fp32_from_fp16_params"] for t in group]
    else:
        mains = [param.detach() for param in ordered]  # fp32 weights are their own masters (loaded already)
    param_state, step = {}, torch.zeros((), dtype=torch.float32)
    for index, (param, main) in enumerate(zip(ordered, mains)):
        state = torch_state["state"].get(index, {})
        if state and not all(key in state for key in ADAM_STATE_KEYS):
            raise CheckpointError(
                "the checkpoint's optimizer state is not Adam's; --use-distributed-optimizer needs Adam "
                "(or load with --no-load-optim)"
            )
        step = state["step"].float() if "step" in state else step
        param_state[names[param]] = {
            "param": main.float(),
            **{key: state.get(key, torch.zeros_like(main, dtype=torch.float32)) for key in ADAM_STATE_KEYS},
        }
    shared = {"optimizer": {"param_groups": torch_state["param_groups"]}}
    if "grad_scaler" in common:
        shared["grad_scaler"] = common["grad_scaler"]
    return shared, {"optimizer": "adam", "step": step, "param_state": param_state}
