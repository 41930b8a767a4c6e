"""Read all tensor-parallel shards of a checkpoint at once, write a whole checkpoint, and publish output
folders atomically. Shared by the resharding and Hugging Face conversion tools.

A checkpoint (layout in `megatron.checkpoint_format`) is read as a `LoadedCheckpoint`: the iteration the
tracker names and the dict `torch.load` gives for each file `mp_rank_XX/model_optim_rng.pt`, in TP-rank
order. Tensors are memory-mapped, so reading is cheap until a tensor is used.

Every tool builds its whole output under `<output>.tmp-<token>` and renames it to `<output>` at the end
(`atomic_output_dir`): a failure or a kill leaves no partial output folder under the final name. An
existing output is refused unless `force`, in which case it is replaced only after the new one is complete.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from megatron.checkpoint_format import (
    CHECKPOINT_VERSION,
    SHARD_FILENAME,
    CheckpointError,
    from_megatron_state_dict,
    get_checkpoint_dir,
    get_checkpoint_name,
    get_checkpoint_tracker_filename,
    read_metadata,
    shard_dir_name,
    to_megatron_state_dict,
    tracker_text,
)
from tools.checkpoint.pp_layout import merge_stages

_SHARD_DIR_RE = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?")


class ToolError(Exception):
    """A user error (bad input path, impossible target, unsupported model); the CLI prints it and exits 1."""


@dataclass
class LoadedCheckpoint:
    """Every TP shard of one checkpoint: `shards[r]` is the file of TP rank r as `torch.load` returns it
    (keys args, checkpoint_version, iteration, model, optimizer, opt_param_scheduler, rng_state).

    A pipeline-parallel checkpoint (`pp_size` > 1 stages) is read as the whole model: `shards[r]` is then
    stage 0's file of TP rank r with `model` replaced by all stages merged (tools/checkpoint/pp_layout.py)
    and `optimizer` by None (tools/checkpoint/pp_optimizer.py merges the optimizer states when asked).
    `stage_files[r][p]` is the file of TP rank r and stage p as read (the same dict as `shards[r]` at PP 1)."""

    load_dir: str
    checkpoint_dir: str
    iteration: int
    release: bool
    shards: list[dict[str, Any]]
    pp_size: int = 1
    stage_files: list[list[dict[str, Any]]] = field(default_factory=list)

    @property
    def tp_size(self) -> int:
        return len(self.shards)

    @property
    def args(self) -> argparse.Namespace:
        """The saved arguments (TP rank 0's); ToolError when the checkpoint holds none."""
        args = self.shards[0].get("args")
        if args is None:
            raise ToolError(
                f"{self.shard_path(0)} holds no 'args'; the tools need the model's shape from them"
            )
        return args

    def shard_path(self, tp_rank: int, pp_rank: int = 0) -> str:
        """The model_optim_rng.pt of TP rank `tp_rank` and pipeline stage `pp_rank`."""
        return os.path.join(
            self.checkpoint_dir,
            shard_dir_name(tp_rank, pp_rank if self.pp_size > 1 else None),
            SHARD_FILENAME,
        )

    def model_shards(self) -> list[dict[str, Tensor]]:
        """The model of each TP rank as a flat state dict (`language_model.encoder.layers.0....`)."""
        return [from_megatron_state_dict(shard["model"]) for shard in self.shards]


def load_checkpoint_shards(load_dir: str) -> LoadedCheckpoint:
    """Read the checkpoint that `<load_dir>/latest_checkpointed_iteration.txt` names, all TP ranks.

    Raises ToolError naming the path when there is no tracker, the tracked dir or a shard file is missing
    or unreadable, the shard dirs are not mp_rank_00 .. mp_rank_{p-1} (or mp_rank_TT_PPP for every TT and
    PPP), or its checkpoint_version orders QKV differently (< 2.0). Pipeline stages are merged (see
    LoadedCheckpoint).
    """
    if not os.path.isdir(load_dir):
        raise ToolError(f"--load {load_dir}: no such directory")
    try:
        metadata = read_metadata(load_dir)
    except CheckpointError as e:
        raise ToolError(str(e)) from None
    if metadata is None:
        raise ToolError(
            f"--load {load_dir} is not a checkpoint directory: "
            f"{get_checkpoint_tracker_filename(load_dir)} not found"
        )
    iteration, release = metadata
    checkpoint_dir = get_checkpoint_dir(load_dir, iteration, release)
    if not os.path.isdir(checkpoint_dir):
        raise ToolError(
            f"{get_checkpoint_tracker_filename(load_dir)} names {tracker_text(iteration, release)!r} "
            f"but {checkpoint_dir} does not exist"
        )
    tp_size, pp_size = _count_shards(checkpoint_dir)
    shards, stage_files = [], []
    for tp_rank in range(tp_size):
        if pp_size == 1:
            shards.append(_load_shard(get_checkpoint_name(load_dir, iteration, tp_rank, release=release)))
            stage_files.append([shards[-1]])
            continue
        stages = [
            _load_shard(get_checkpoint_name(load_dir, iteration, tp_rank, pp_rank, release=release))
            for pp_rank in range(pp_size)
        ]
        shards.append(_merged_stages(stages, checkpoint_dir))
        stage_files.append(stages)
    loaded = LoadedCheckpoint(load_dir, checkpoint_dir, iteration, release, shards, pp_size, stage_files)
    saved_tp = getattr(loaded.args, "tensor_model_parallel_size", tp_size)
    if saved_tp != tp_size:
        raise ToolError(
            f"{checkpoint_dir} has {tp_size} mp_rank_XX shard dirs but its args say "
            f"tensor_model_parallel_size={saved_tp}: the checkpoint is incomplete"
        )
    return loaded


def _merged_stages(stages: list[dict[str, Any]], checkpoint_dir: str) -> dict[str, Any]:
    """One TP rank's pipeline stages as a single-file state holding the whole model (see LoadedCheckpoint)."""
    args = stages[0].get("args")
    if args is None:
        raise ToolError(
            f"{checkpoint_dir}: stage 0 holds no 'args'; the tools need the model's shape from them"
        )
    try:
        whole = merge_stages(stages, args, checkpoint_dir)
    except ValueError as e:
        raise ToolError(str(e)) from None
    return {**stages[0], "model": to_megatron_state_dict(whole), "optimizer": None}


def _count_shards(checkpoint_dir: str) -> tuple[int, int]:
    """(t, p) for shard dirs mp_rank_00 .. mp_rank_{t-1}, or mp_rank_TT_PPP for all TT < t and PPP < p;
    ToolError for none, gaps, or a mix of the two forms."""
    found = set()
    for entry in os.listdir(checkpoint_dir):
        match = _SHARD_DIR_RE.fullmatch(entry)
        if match is None or not os.path.isdir(os.path.join(checkpoint_dir, entry)):
            continue
        found.add((int(match.group(1)), None if match.group(2) is None else int(match.group(2))))
    if not found:
        raise ToolError(f"{checkpoint_dir} holds no mp_rank_XX shard directories")
    tp_ranks = {tp for tp, _ in found}
    pp_ranks = {pp for _, pp in found}
    if None in pp_ranks and len(pp_ranks) > 1:
        raise ToolError(f"{checkpoint_dir} mixes mp_rank_XX and mp_rank_XX_YYY shard directories")
    pp_size = 1 if None in pp_ranks else len(pp_ranks)
    expected = {
        (tp, None if None in pp_ranks else pp) for tp in range(len(tp_ranks)) for pp in range(pp_size)
    }
    if found != expected:
        missing = sorted(shard_dir_name(tp, pp) for tp, pp in expected - found)
        raise ToolError(f"{checkpoint_dir}: shard dirs {missing} are missing (incomplete checkpoint)")
    return len(tp_ranks), pp_size


def _load_shard(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ToolError(f"checkpoint file {path} not found (incomplete checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # a truncated or foreign file: say which
        raise ToolError(f"cannot read checkpoint file {path}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not ("model" in state or "model0" in state):  # model0..: interleaved
        raise ToolError(f"{path} is not a Megatron checkpoint file (no 'model' entry)")
    version = state.get("checkpoint_version", 0.0)
    if version < 2.0:
        raise ToolError(
            f"{path}: checkpoint_version {version} orders the QKV rows differently (< 2.0); "
            "convert it with Megatron-LM first"
        )
    return state


def shard_file_state(
    args: argparse.Namespace,
    iteration: int,
    model: dict[str, Tensor],
    optimizer: Optional[dict[str, Any]] = None,
    opt_param_scheduler: Optional[dict[str, Any]] = None,
    rng_state: Optional[list[dict[str, Any]]] = None,
) -> dict[str, Any]:
    """The dict one `model_optim_rng.pt` holds, with `model` given flat and stored nested."""
    return {
        "args": args,
        "checkpoint_version": CHECKPOINT_VERSION,
        "iteration": iteration,
        "model": to_megatron_state_dict(model),
        "optimizer": optimizer,
        "opt_param_scheduler": opt_param_scheduler,
        "rng_state": rng_state,
    }


def write_checkpoint(
    save_dir: str,
    iteration: int,
    release: bool,
    shards: list[dict[str, Any]],
    pp_size: int = 1,
    extra_files: Optional[list[dict[str, Any]]] = None,
) -> None:
    """Write `shards[r]` to `<save_dir>/{iter_XXXXXXX|release}/mp_rank_{r:02d}/model_optim_rng.pt` and the
    tracker file; with `pp_size` > 1, `shards[t * pp_size + p]` to `mp_rank_{t:02d}_{p:03d}`. Each
    `extra_files[i][filename]` (e.g. distrib_optim.pt) is written beside shard i. `save_dir` is meant to be
    the temporary folder of `atomic_output_dir`."""
    for index, state in enumerate(shards):
        tp_rank, pp_rank = divmod(index, pp_size)
        path = get_checkpoint_name(
            save_dir, iteration, tp_rank, pp_rank if pp_size > 1 else None, release=release
        )
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(state, path)
        for filename, content in (extra_files[index] if extra_files else {}).items():
            torch.save(content, os.path.join(os.path.dirname(path), filename))
    with open(get_checkpoint_tracker_filename(save_dir), "w", encoding="utf-8") as f:
        f.write(tracker_text(iteration, release))


@contextmanager
def atomic_output_dir(path: str, force: bool, flag: str) -> Iterator[str]:
    """Yield a fresh temporary folder next to `path`; when the block succeeds, rename it to `path`.

    `path` must not exist (ToolError naming `flag`), unless `force`: then the old folder is renamed away
    and deleted once the new one is in place. On any exception the temporary folder is deleted, so no
    partial output remains.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not force:
        raise ToolError(f"{flag} {path} already exists; choose a new folder or pass --force to replace it")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ToolError(f"{flag} {path}: parent directory {parent} does not exist")
    token = uuid.uuid4().hex[:12]
    temp = f"{path}.tmp-{token}"
    os.makedirs(temp)
    try:
        yield temp
        _fsync_tree(temp)
        replaced = None
        if os.path.exists(path):
            replaced = f"{path}.old-{token}"
            os.rename(path, replaced)
        os.rename(temp, path)
        if replaced is not None and os.path.isdir(replaced):
            shutil.rmtree(replaced)
        elif replaced is not None:
            os.remove(replaced)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _fsync_tree(root: str) -> None:
    """fsync every file and directory under `root`, so the rename publishes complete data."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_distinct_paths(source: str, target: str, source_flag: str, target_flag: str) -> None:
    """ToolError when the output folder is the input, or contains it (--force would delete the input)."""
    source, target = os.path.realpath(source), os.path.realpath(target)
    if source == target or source.startswith(target + os.sep):
        raise ToolError(f"{target_flag} {target} must be a different folder from {source_flag} {source}")
