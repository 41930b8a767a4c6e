"""Reshard a checkpoint's optimizer state (fp32 main params and the optimizer's moments) to another TP size.

The states here are whole-model ones, as a pipeline size 1 run writes them; tools/checkpoint/pp_optimizer.py
merges pipeline stages into that form and splits it again.

The state of one TP rank (megatron/optimizer/optimizer.py) is, for fp32 training, the torch optimizer's
state dict

    {"state": {i: {"step": scalar tensor, "exp_avg": T_i, "exp_avg_sq": T_i}},     (Adam; SGD: momentum_buffer)
     "param_groups": [{"params": [i, ...], "lr": ..., "wd_mult": ...}, ...]}

and for fp16/bf16 training {"optimizer": <that>, "fp32_from_fp16_params": [[fp32 copy of each half-precision
param] per param group], "grad_scaler": {...} (fp16)}. The integer i numbers the parameters across the
param groups, in the order `megatron.optimizer.optimizer.get_param_groups` lists them (decayed parameters,
then biases and 1-D parameters, each in `named_parameters()` order); that order is rebuilt here from the
names of the model state dict, so each T_i gets the name of its parameter. A T_i shaped like its parameter's
shard is then merged, re-padded and split exactly as the parameter itself (tools/checkpoint/tp_layout.py);
scalars such as Adam's step count are the same on every TP rank and are copied.

A checkpoint of the distributed optimizer (megatron/optimizer/distrib_optim.py) keeps in
model_optim_rng.pt only what all ranks share (param-group hyperparameters, loss scaler; copied) and, in
`mp_rank_XX/distrib_optim.pt`, every parameter's fp32 master weight and Adam moments keyed by the
parameter's name and shaped like its shard: `reshard_distrib_optim` reshards those like the parameters.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from megatron.optimizer.optimizer import get_param_groups
from tools.checkpoint.checkpoint_io import ToolError
from tools.checkpoint.tp_layout import merge_shards, repad_vocab, split_whole

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def optimizer_param_names(model: dict[str, Tensor]) -> list[list[str]]:
    """Names of the parameters in each optimizer param group, in optimizer index order.

    `model` is a flat model state dict (any TP rank). A tree of modules with meta-device parameters of
    the same names and shapes is handed to `get_param_groups`, the function the optimizer was built with.
    """
    return [names for _, names in optimizer_groups(model)]


def optimizer_groups(model: dict[str, Tensor]) -> list[tuple[float, list[str]]]:
    """(wd_mult, parameter names) of each optimizer param group, as `optimizer_param_names` finds them."""
    root = nn.Module()
    for name, tensor in model.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        module.register_parameter(leaf, nn.Parameter(torch.empty(tensor.shape, device="meta")))
    names = {id(param): name for name, param in root.named_parameters()}
    return [
        (group["wd_mult"], [names[id(param)] for param in group["params"]])
        for group in get_param_groups(root)
    ]


def reshard_optimizer(
    optimizer_shards: list[dict[str, Any]],
    model_shards: list[dict[str, Tensor]],
    target_tp: int,
    padded_vocab_size: int,
    swiglu: bool = False,
) -> list[dict[str, Any]]:
    """The optimizer state of each of `target_tp` TP ranks, from the states of the source TP ranks.

    `model_shards` are the flat model state dicts of the source ranks (they name the parameters and give
    their shard shapes and dtypes); `padded_vocab_size` is the target's padded vocabulary; `swiglu`: the
    MLP's fused [gate; up] layout (tools/checkpoint/tp_layout). Raises ToolError
    when the state does not match the model or differs between TP ranks where it must not.
    """
    mixed = "fp32_from_fp16_params" in optimizer_shards[0]
    torch_states = [shard["optimizer"] if mixed else shard for shard in optimizer_shards]
    group_names = optimizer_param_names(model_shards[0])
    index_names = [_index_to_name(state, group_names, tp_rank) for tp_rank, state in enumerate(torch_states)]
    _check_same_across_ranks([state["param_groups"] for state in torch_states], "optimizer param_groups")

    per_name = [
        {index_names[r][i]: entry for i, entry in state["state"].items()}
        for r, state in enumerate(torch_states)
    ]
    new_per_name = _reshard_entries(per_name, model_shards, target_tp, padded_vocab_size, swiglu)
    new_torch_states = []
    for tp_rank in range(target_tp):
        state = {
            i: new_per_name[tp_rank][name]
            for i, name in index_names[0].items()
            if name in new_per_name[tp_rank]
        }
        new_torch_states.append(
            {"state": state, "param_groups": copy.deepcopy(torch_states[0]["param_groups"])}
        )
    if not mixed:
        return new_torch_states

    main_copies = _reshard_main_copies(
        [shard["fp32_from_fp16_params"] for shard in optimizer_shards],
        group_names,
        model_shards,
        target_tp,
        padded_vocab_size,
        swiglu,
    )
    scaler = optimizer_shards[0].get("grad_scaler")  # fp16 only; the same on every TP rank
    _check_same_across_ranks([shard.get("grad_scaler") for shard in optimizer_shards], "grad_scaler state")
    new_shards = []
    for tp_rank in range(target_tp):
        shard = {"optimizer": new_torch_states[tp_rank], "fp32_from_fp16_params": main_copies[tp_rank]}
        if scaler is not None:
            shard["grad_scaler"] = copy.deepcopy(scaler)
        new_shards.append(shard)
    return new_shards


def _index_to_name(torch_state: dict[str, Any], group_names: list[list[str]], tp_rank: int) -> dict[int, str]:
    groups = torch_state["param_groups"]
    sizes = [len(group["params"]) for group in groups]
    expected = [len(names) for names in group_names]
    if sizes != expected:
        raise ToolError(
            f"the optimizer state of TP rank {tp_rank} has param groups of sizes {sizes}, but the model's "
            f"parameters form groups of sizes {expected}; it was not written by this project's optimizer "
            "(run without --keep-optimizer to drop it)"
        )
    return {i: name for group, names in zip(groups, group_names) for i, name in zip(group["params"], names)}


def _reshard_entries(
    per_name: list[dict[str, dict[str, Any]]],
    model_shards: list[dict[str, Tensor]],
    target_tp: int,
    padded_vocab_size: int,
    swiglu: bool,
) -> list[dict[str, dict[str, Any]]]:
    """Per-parameter optimizer entries ({"exp_avg": ..., "step": ...}) of each target rank.

    An entry tensor shaped like its parameter's shard is resharded like the parameter; any other value
    must be equal on all source ranks and is copied.
    """
    names = list(per_name[0])
    if any(set(entries) != set(names) for entries in per_name):
        raise ToolError("the TP ranks hold optimizer state for different parameters; cannot reshard it")
    split_values: dict[str, list[dict[str, Tensor]]] = {}  # state key -> per source rank {param name: T}
    copied: dict[str, dict[str, Any]] = {name: {} for name in names}
    for name in names:
        keys = list(per_name[0][name])
        for key in keys:
            values = [entries[name].get(key) for entries in per_name]
            if all(_is_param_shaped(v, model_shards[r][name]) for r, v in enumerate(values)):
                split_values.setdefault(key, [{} for _ in per_name])
                for r, value in enumerate(values):
                    split_values[key][r][name] = value
            else:
                _check_same_across_ranks(values, f"optimizer state {key!r} of {name}")
                copied[name][key] = values[0]

    new = [{name: {} for name in names} for _ in range(target_tp)]
    for key, shards in split_values.items():
        whole = repad_vocab(merge_shards(shards, f"optimizer {key}", swiglu), padded_vocab_size)
        for tp_rank, shard in enumerate(split_whole(whole, target_tp, swiglu)):
            for name, tensor in shard.items():
                new[tp_rank][name][key] = tensor
    for tp_rank in range(target_tp):  # keep each entry's original key order
        for name in names:
            entry = {**new[tp_rank][name], **copied[name]}
            new[tp_rank][name] = {key: entry[key] for key in per_name[0][name]}
    return new


def _reshard_main_copies(
    main_copies: list[list[list[Tensor]]],
    group_names: list[list[str]],
    model_shards: list[dict[str, Tensor]],
    target_tp: int,
    padded_vocab_size: int,
    swiglu: bool,
) -> list[list[list[Tensor]]]:
    """`fp32_from_fp16_params` of each target rank: per group, the fp32 copies of the half-precision params."""
    half_names = [[n for n in names if model_shards[0][n].dtype in _HALF_DTYPES] for names in group_names]
    per_rank: list[dict[str, Tensor]] = []
    for tp_rank, groups in enumerate(main_copies):
        sizes, expected = [len(g) for g in groups], [len(n) for n in half_names]
        if sizes != expected:
            raise ToolError(
                f"fp32_from_fp16_params of TP rank {tp_rank} has groups of sizes {sizes}, but the model has "
                f"{expected} half-precision parameters per group"
            )
        named = {name: t for group, names in zip(groups, half_names) for t, name in zip(group, names)}
        for name, tensor in named.items():
            if tensor.shape != model_shards[tp_rank][name].shape:
                raise ToolError(
                    f"fp32 main copy of {name} on TP rank {tp_rank} has shape {tuple(tensor.shape)}, the "
                    f"parameter {tuple(model_shards[tp_rank][name].shape)}"
                )
        per_rank.append(named)
    whole = repad_vocab(merge_shards(per_rank, "fp32 main params", swiglu), padded_vocab_size)
    return [
        [[shard[name] for name in names] for names in half_names]
        for shard in split_whole(whole, target_tp, swiglu)
    ]


def _is_param_shaped(value: Any, param: Tensor) -> bool:
    return isinstance(value, Tensor) and value.dim() > 0 and value.shape == param.shape


def _check_same_across_ranks(values: list[Any], what: str) -> None:
    for tp_rank, value in enumerate(values[1:], start=1):
        if not _same(value, values[0]):
            raise ToolError(f"{what} differs between TP ranks 0 and {tp_rank}; cannot reshard it")


def _same(a: Any, b: Any) -> bool:
    """Structural equality that compares tensors and numpy arrays by value (bitwise)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):  # numpy's RNG state
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def is_distributed_optimizer_state(optimizer_state: dict[str, Any]) -> bool:
    """True for the shared part of a distributed-optimizer state (its tensors are in distrib_optim.pt)."""
    return "sharded_state" in optimizer_state


def reshard_shared_state(optimizer_shards: list[dict[str, Any]], target_tp: int) -> list[dict[str, Any]]:
    """The shared distributed-optimizer state, equal on all TP ranks, copied to each target rank."""
    _check_same_across_ranks(optimizer_shards, "the distributed optimizer's shared state")
    return [copy.deepcopy(optimizer_shards[0]) for _ in range(target_tp)]


def reshard_distrib_optim(
    distrib_shards: list[dict[str, Any]],
    model_shards: list[dict[str, Tensor]],
    target_tp: int,
    padded_vocab_size: int,
    swiglu: bool = False,
) -> list[dict[str, Any]]:
    """The distrib_optim.pt content of each target TP rank: every per-parameter tensor ("param",
    "exp_avg", "exp_avg_sq") merged, re-padded and split like its parameter (SwiGLU's [gate; up] halves
    each on their own when `swiglu`); "step" and "optimizer" copied."""
    _check_same_across_ranks([{k: v for k, v in d.items() if k != "param_state"} for d in distrib_shards],
                             "distrib_optim.pt step / optimizer")  # fmt: skip
    for tp_rank, (distrib, model) in enumerate(zip(distrib_shards, model_shards)):
        for name, entry in distrib["param_state"].items():
            if name not in model or any(not _is_param_shaped(t, model[name]) for t in entry.values()):
                raise ToolError(
                    f"distrib_optim.pt of TP rank {tp_rank}: the state of {name} does not fit the model"
                )
    keys = list(next(iter(distrib_shards[0]["param_state"].values())))
    split = {}
    for key in keys:
        per_rank = [{name: e[key] for name, e in d["param_state"].items()} for d in distrib_shards]
        whole = repad_vocab(merge_shards(per_rank, f"distrib_optim {key}", swiglu), padded_vocab_size)
        split[key] = split_whole(whole, target_tp, swiglu)
    new = []
    for tp_rank in range(target_tp):
        names = split[keys[0]][tp_rank]
        state = {name: {key: split[key][tp_rank][name] for key in keys} for name in names}
        new.append({**{k: copy.deepcopy(v) for k, v in distrib_shards[0].items() if k != "param_state"},
                    "param_state": state})  # fmt: skip
    return new
