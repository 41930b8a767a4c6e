"""Merge the optimizer states of a checkpoint's pipeline stages into the whole model's, and split them
again: the optimizer-state companion of pp_layout.py.

Each stage's optimizer (megatron/optimizer) covers the stage's own parameters, grouped by
`get_param_groups` of the stage's module (weight-decayed parameters, then biases and 1-D parameters) and
numbered in that order; an interleaved stage's module is the nn.ModuleList of its chunks, so its
parameters are named `0.language_model...`, `1.language_model...`. Every per-parameter value is therefore
named here by the stage-local parameter name, then by its whole-model name (global layer number,
`pp_layout.global_key`):

    plain optimizer     state[i] (Adam's step/exp_avg/exp_avg_sq, SGD's momentum_buffer) and, for
                        fp16/bf16, the fp32 main copy in fp32_from_fp16_params, of parameter i
    distributed         distrib_optim.pt's param_state[name] ({"param", "exp_avg", "exp_avg_sq"})

and the param groups' hyperparameters by their `wd_mult` (a stage holds one group per wd_mult present).
The whole-model state is exactly what a pipeline size 1 run of the same model writes (optimizer indices of
the whole model's groups), so optimizer_state.py reshards it over TP unchanged; splitting it gives each
target stage the state its own optimizer writes.

The tied word embedding: the last stage's `word_embeddings_for_head` is a parameter of its optimizer.
Its gradient is the embedding group's all-reduced sum, the same as the first stage's embedding's, so its
moments and fp32 master stay bitwise equal to those of the first stage's copy (as the weights do).
Merging keeps the first stage's (a warning names a difference); splitting to PP > 1 gives the last stage a
copy of the word embedding's state, which is what the training run holds there. An untied output layer
(Llama's output_layer) is an ordinary parameter of the last stage.

Values the stages share (Adam's step count in distrib_optim.pt, the fp16 loss scaler, hyperparameters)
must agree between stages; ToolError otherwise.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

from megatron.checkpoint_format import from_megatron_state_dict
from megatron.parallel.pipeline_layout import StageLayout, global_key, stage_layouts
from tools.checkpoint.checkpoint_io import ToolError
from tools.checkpoint.optimizer_state import _HALF_DTYPES, _same, optimizer_groups
from tools.checkpoint.pp_layout import TIED_KEY, saved_layouts


@dataclass
class Named:
    """One stage's or the whole model's plain optimizer state, by parameter name."""

    entries: dict[str, dict[str, Any]]  # name -> torch optimizer state entry (step, exp_avg, ...)
    groups: dict[float, dict[str, Any]]  # wd_mult -> the param group's hyperparameters
    masters: Optional[dict[str, Tensor]]  # name -> fp32 main copy (fp16/bf16 training), else None
    extra: dict[str, Any]  # the other keys of a mixed-precision state (grad_scaler)


def stage_model(
    stage_file: dict[str, Any], chunks: list[StageLayout]
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(the stage's parameters keyed as its optimizer names them, local name -> whole-model name)."""
    flat, to_global = {}, {}
    for index, layout in enumerate(chunks):
        key, prefix = ("model", "") if len(chunks) == 1 else (f"model{index}", f"{index}.")
        for name, tensor in from_megatron_state_dict(stage_file[key]).items():
            flat[prefix + name] = tensor
            to_global[prefix + name] = global_key(name, layout)
    return flat, to_global


def target_stage_names(stage_models: list[dict[str, Tensor]], num_layers: int) -> list[dict[str, str]]:
    """local name -> whole-model name for each stage of an even split (pp_layout.split_stages)."""
    layouts = [chunks[0] for chunks in stage_layouts(num_layers, len(stage_models))]
    return [
        {name: global_key(name, layout) for name in model} for model, layout in zip(stage_models, layouts)
    ]


# ----------------------------------------------------------------------------------- plain optimizer


def to_named(state: dict[str, Any], model: dict[str, Tensor], where: str) -> Named:
    """The plain optimizer `state` of the module whose parameters are `model`, by parameter name."""
    mixed = "fp32_from_fp16_params" in state
    torch_state = state["optimizer"] if mixed else state
    groups = optimizer_groups(model)
    saved = torch_state["param_groups"]
    if [len(g["params"]) for g in saved] != [len(names) for _, names in groups]:
        raise ToolError(
            f"{where}: the optimizer's param groups have sizes {[len(g['params']) for g in saved]}, but the "
            f"model's parameters form groups of sizes {[len(n) for _, n in groups]}; it was not written by "
            "this project's optimizer (run without --keep-optimizer to drop it)"
        )
    index_name = {
        i: name for group, (_, names) in zip(saved, groups) for i, name in zip(group["params"], names)
    }
    named = Named(
        entries={index_name[i]: entry for i, entry in torch_state["state"].items()},
        groups={wd: _hyper(group) for group, (wd, _) in zip(saved, groups)},
        masters=None,
        extra={k: v for k, v in state.items() if k not in ("optimizer", "fp32_from_fp16_params")}
        if mixed
        else {},
    )
    if mixed:
        half = [[n for n in names if model[n].dtype in _HALF_DTYPES] for _, names in groups]
        copies = state["fp32_from_fp16_params"]
        if [len(g) for g in copies] != [len(n) for n in half]:
            raise ToolError(
                f"{where}: fp32_from_fp16_params does not match the model's half-precision parameters"
            )
        named.masters = {n: t for group, names in zip(copies, half) for t, n in zip(group, names)}
    return named


def from_named(named: Named, model: dict[str, Tensor], where: str) -> dict[str, Any]:
    """The plain optimizer state that the module whose parameters are `model` saves (inverse of to_named)."""
    groups, state, param_groups, copies = optimizer_groups(model), {}, [], []
    index = 0
    for wd_mult, names in groups:
        if wd_mult not in named.groups:
            raise ToolError(f"{where}: the source optimizer has no param group with wd_mult {wd_mult}")
        param_groups.append({**copy.deepcopy(named.groups[wd_mult]), "params": []})
        for name in names:
            if name in named.entries:
                state[index] = named.entries[name]
            param_groups[-1]["params"].append(index)
            index += 1
        if named.masters is not None:
            copies.append([named.masters[n] for n in names if model[n].dtype in _HALF_DTYPES])
    torch_state = {"state": state, "param_groups": param_groups}
    if named.masters is None:
        return torch_state
    return {"optimizer": torch_state, "fp32_from_fp16_params": copies, **copy.deepcopy(named.extra)}


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != "params"}


def merge_stage_optimizers(
    stage_files: list[dict[str, Any]], args: argparse.Namespace, whole: dict[str, Tensor], where: str
) -> dict[str, Any]:
    """The whole model's plain optimizer state (as PP 1 saves it) from one TP rank's stage files."""
    parts = []
    for stage, (chunks, stage_file) in enumerate(zip(saved_layouts(args), stage_files)):
        state = _require_optimizer(stage_file, f"{where} stage {stage}")
        model, to_global = stage_model(stage_file, chunks)
        parts.append((to_named(state, model, f"{where} stage {stage}"), to_global))
    mixed = parts[0][0].masters is not None
    merged = Named(entries={}, groups={}, masters={} if mixed else None, extra=parts[0][0].extra)
    for stage, (named, to_global) in enumerate(parts):
        _merge_shared(merged.groups, named.groups, f"{where}: optimizer hyperparameters of stage {stage}")
        if (named.masters is not None) != mixed or not _same(named.extra, merged.extra):
            raise ToolError(
                f"{where}: the fp32 main params or loss-scaler state of stage {stage} differ from stage 0's"
            )
        for name, entry in named.entries.items():
            _merge_value(merged.entries, to_global[name], entry, f"{where}: optimizer state of {name}")
        for name, master in (named.masters or {}).items():
            _merge_value(merged.masters, to_global[name], master, f"{where}: fp32 main param of {name}")
    return from_named(merged, whole, where)


def split_stage_optimizer(state: dict[str, Any], whole: dict[str, Tensor], stage_models: list[dict[str, Tensor]],
                          num_layers: int) -> list[dict[str, Any]]:  # fmt: skip
    """The plain optimizer state of each even target stage from the whole model's (one TP rank)."""
    named = to_named(state, whole, "resharded optimizer")
    out = []
    for model, names in zip(stage_models, target_stage_names(stage_models, num_layers)):
        local = dataclasses.replace(
            named,
            entries={n: named.entries[g] for n, g in names.items() if g in named.entries},
            masters=None
            if named.masters is None
            else {n: named.masters[g] for n, g in names.items() if g in named.masters},
        )
        out.append(from_named(local, model, "resharded optimizer"))
    return out


# ------------------------------------------------------------------------------ distributed optimizer


def merge_stage_shared(
    stage_files: list[dict[str, Any]], args: argparse.Namespace, whole: dict[str, Tensor], where: str
) -> dict[str, Any]:
    """The whole model's model_optim_rng.pt "optimizer" entry of the distributed optimizer (param-group
    hyperparameters, loss scaler), from one TP rank's stage files."""
    groups: dict[float, dict[str, Any]] = {}
    first = _require_optimizer(stage_files[0], f"{where} stage 0")
    for stage, (chunks, stage_file) in enumerate(zip(saved_layouts(args), stage_files)):
        state = _require_optimizer(stage_file, f"{where} stage {stage}")
        if not _same(
            {k: v for k, v in state.items() if k != "optimizer"},
            {k: v for k, v in first.items() if k != "optimizer"},
        ):
            raise ToolError(
                f"{where}: the distributed optimizer's loss-scaler state of stage {stage} differs from stage 0's"
            )
        wd_mults = [wd for wd, _ in optimizer_groups(stage_model(stage_file, chunks)[0])]
        saved = state["optimizer"]["param_groups"]
        if len(saved) != len(wd_mults):
            raise ToolError(
                f"{where} stage {stage}: {len(saved)} optimizer param groups, the model has {len(wd_mults)}"
            )
        _merge_shared(
            groups, dict(zip(wd_mults, saved)), f"{where}: optimizer hyperparameters of stage {stage}"
        )
    return split_shared(first, groups, whole, where)


def split_shared(
    state: dict[str, Any], groups: dict[float, dict[str, Any]], model: dict[str, Tensor], where: str
) -> dict[str, Any]:
    """`state` (a distributed optimizer's shared entry) with the param groups of the module `model`."""
    wd_mults = [wd for wd, _ in optimizer_groups(model)]
    missing = [wd for wd in wd_mults if wd not in groups]
    if missing:
        raise ToolError(f"{where}: the source optimizer has no param group with wd_mult {missing[0]}")
    return {
        **copy.deepcopy(state),
        "optimizer": {"param_groups": [copy.deepcopy(groups[wd]) for wd in wd_mults]},
    }


def shared_groups(state: dict[str, Any], model: dict[str, Tensor]) -> dict[float, dict[str, Any]]:
    """wd_mult -> hyperparameters of a distributed optimizer's shared entry for the module `model`."""
    return dict(zip([wd for wd, _ in optimizer_groups(model)], state["optimizer"]["param_groups"]))


def merge_stage_distrib(
    distrib_files: list[dict[str, Any]],
    stage_files: list[dict[str, Any]],
    args: argparse.Namespace,
    where: str,
) -> dict[str, Any]:
    """The whole model's distrib_optim.pt content from one TP rank's stages' files (global names)."""
    param_state: dict[str, dict[str, Tensor]] = {}
    for stage, (chunks, stage_file, distrib) in enumerate(
        zip(saved_layouts(args), stage_files, distrib_files)
    ):
        if not _same({k: v for k, v in distrib.items() if k != "param_state"},
                     {k: v for k, v in distrib_files[0].items() if k != "param_state"}):  # fmt: skip
            raise ToolError(f"{where}: distrib_optim.pt of stage {stage} has another step count or optimizer")
        _, to_global = stage_model(stage_file, chunks)
        for name, entry in distrib["param_state"].items():
            if name not in to_global:
                raise ToolError(
                    f"{where} stage {stage}: distrib_optim.pt holds state of {name}, not in the model"
                )
            _merge_value(
                param_state, to_global[name], entry, f"{where}: distributed optimizer state of {name}"
            )
    return {**{k: v for k, v in distrib_files[0].items() if k != "param_state"}, "param_state": param_state}


def split_stage_distrib(
    distrib: dict[str, Any], stage_models: list[dict[str, Tensor]], num_layers: int
) -> list[dict[str, Any]]:
    """The distrib_optim.pt content of each even target stage from the whole model's (one TP rank)."""
    rest = {k: v for k, v in distrib.items() if k != "param_state"}
    return [
        {
            **copy.deepcopy(rest),
            "param_state": {
                n: distrib["param_state"][g] for n, g in names.items() if g in distrib["param_state"]
            },
        }
        for names in target_stage_names(stage_models, num_layers)
    ]


# ------------------------------------------------------------------------------------------ helpers


def _require_optimizer(stage_file: dict[str, Any], where: str) -> dict[str, Any]:
    state = stage_file.get("optimizer")
    if state is None:
        raise ToolError(f"--keep-optimizer: {where} holds no optimizer state; run without it")
    return state


def _merge_shared(merged: dict[float, Any], groups: dict[float, Any], what: str) -> None:
    for wd_mult, hyper in groups.items():
        hyper = _hyper(hyper)
        if wd_mult in merged and not _same(merged[wd_mult], hyper):
            raise ToolError(f"{what} differ from an earlier stage's ({merged[wd_mult]} vs {hyper})")
        merged.setdefault(wd_mult, hyper)


def _merge_value(merged: dict[str, Any], name: str, value: Any, what: str) -> None:
    """merged[name] = value; a second value for the name (the head copy of the tied embedding) must equal
    the first, else a warning, keeping the first stage's."""
    if name not in merged:
        merged[name] = value
    elif name != TIED_KEY:
        raise ToolError(f"{what}: two stages hold state for {name}")
    elif not _same(merged[name], value):
        print(f"warning: {what} differs from the first stage's word embeddings'; keeping the first stage's",
              file=sys.stderr)  # fmt: skip
