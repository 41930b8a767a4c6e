"""Save and load training checkpoints in Megatron-LM's classic layout, atomically, for an exact resume.

Layout and file contents: see `megatron.checkpoint_format`. What a save does, on every rank:

1. Global rank 0 deletes debris of crashed saves (`*.tmp-*` dirs, `*.old-*` dirs whose checkpoint is in
   place) and picks a fresh token; all ranks receive it by broadcast. The checkpoint is written to
   `<save>/iter_0000100.tmp-<token>/`, never straight to its final name.
2. Each rank's RNG states are gathered over its data-parallel (DP) group, so `rng_state` is a list
   indexed by DP rank.
3. DP rank 0 of each tensor-parallel (TP) rank writes `mp_rank_XX/model_optim_rng.pt` inside the
   temporary dir (torch.save to `*.pt.tmp`, fsync, os.replace).
4. All ranks agree that every writer succeeded (an all-reduce of a success flag, which is also the
   barrier); otherwise every rank raises CheckpointError and nothing below happens.
5. Global rank 0 renames the temporary dir to `iter_0000100` (an existing dir of that name is first
   renamed to `iter_0000100.old-<token>` and deleted after), fsyncs, then replaces the tracker file
   through a temporary file. A final all-reduce of success flags ends the save on all ranks together.

So after `kill -9` at any moment the tracker names a complete checkpoint: it is only ever rewritten after
the directory it names is in place. The one window where a tracked dir is briefly absent (re-saving the
same iteration, between the two renames of step 5) is covered on load by reading `<dir>.old-<token>`.

Loading reads the tracker, checks the checkpoint's TP size against this run's, and restores the model,
optimizer, LR scheduler and RNG states (python, numpy, torch, CUDA, the TP RNG tracker) of this rank.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import uuid
from typing import Any, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from megatron.arguments import model_flag_differences
from megatron.checkpoint_format import (
    CHECKPOINT_VERSION,
    RELEASE,
    SHARD_FILENAME,
    TRACKER_FILENAME,
    CheckpointError,
    count_shards,
    from_megatron_state_dict,
    get_checkpoint_dir,
    get_checkpoint_name,
    get_checkpoint_tracker_filename,
    read_metadata,
    shard_dir_name,
    to_megatron_state_dict,
    tracker_text,
)
from megatron.optimizer.distrib_optim import (
    DISTRIB_OPTIM_FILENAME,
    load_optimizer_state,
    sharded_optimizer_state,
)
from megatron.parallel.collectives import all_ranks
from megatron.parallel.random import get_rng_tracker
from megatron.parallel.state import ParallelState, print_rank_0

__all__ = [
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "from_megatron_state_dict",
    "get_checkpoint_dir",
    "get_checkpoint_name",
    "get_checkpoint_tracker_filename",
    "load_args_from_checkpoint",
    "load_checkpoint",
    "read_metadata",
    "save_checkpoint",
    "to_megatron_state_dict",
]

# Debris of interrupted saves: `iter_0000100.tmp-<token>` (being written), `iter_0000100.old-<token>`
# (a replaced checkpoint of the same iteration), `latest_checkpointed_iteration.txt.tmp-<token>`.
_DEBRIS_RE = re.compile(rf"(iter_\d{{7}}|{RELEASE}|{re.escape(TRACKER_FILENAME)})\.(tmp|old)-[0-9a-f]+")


class Stateful(Protocol):
    """An optimizer or LR scheduler: anything with a state_dict() that load_state_dict() restores."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


# ---------------------------------------------------------------------------------------------- save


def save_checkpoint(
    iteration: int,
    model: nn.Module,
    optimizer: Optional[Stateful],
    opt_param_scheduler: Optional[Stateful],
    args: argparse.Namespace,
    parallel: ParallelState,
    save_dir: str,
    *,
    save_optim: bool = True,
    save_rng: bool = True,
) -> str:
    """Write `<save_dir>/iter_{iteration:07d}/mp_rank_XX/model_optim_rng.pt` atomically; return that iteration dir.

    Collective: every rank calls it. `model` is the unwrapped module whose flat state_dict() is stored in
    Megatron's nested layout; `args` (with consumed_train_samples / consumed_valid_samples) is stored as
    given; `optimizer` / `opt_param_scheduler` may be None (stored as None). As Megatron's --no-save-optim
    and --no-save-rng, `save_optim=False` leaves out the `optimizer` and `opt_param_scheduler` keys and
    `save_rng=False` the `rng_state` key (loading such a checkpoint then needs --no-load-optim /
    --no-load-rng or --finetune). Raises CheckpointError on every rank when any rank fails to write; the
    tracker then still names the previous checkpoint.
    """
    final_dir = get_checkpoint_dir(save_dir, iteration)
    print_rank_0(parallel, f"saving checkpoint at iteration {iteration:7d} to {save_dir}")
    token = _agree_on_token(save_dir, parallel)
    temp_dir = f"{final_dir}.tmp-{token}"
    rng_states = _gather_rng_states(parallel) if save_rng else None
    distrib_optim_state = sharded_optimizer_state(optimizer)  # collective over DP; None unless ZeRO

    error: Optional[Exception] = None
    if parallel.dp_rank == 0:  # one writer per TP rank and pipeline stage
        shard_path = os.path.join(temp_dir, _shard_dir(parallel), SHARD_FILENAME)
        try:
            state = {
                "args": args,
                "checkpoint_version": CHECKPOINT_VERSION,
                "iteration": iteration,
                **_model_states(model),
            }
            if save_optim:
                state["optimizer"] = None if optimizer is None else optimizer.state_dict()
                state["opt_param_scheduler"] = (
                    None if opt_param_scheduler is None else opt_param_scheduler.state_dict()
                )
            if save_rng:
                state["rng_state"] = rng_states
            _write_file_atomically(state, shard_path)
            if distrib_optim_state is not None:
                distrib_path = os.path.join(os.path.dirname(shard_path), DISTRIB_OPTIM_FILENAME)
                _write_file_atomically(distrib_optim_state, distrib_path)
        except Exception as e:  # reported on every rank below, so that no rank waits forever
            error = e
    _raise_unless_all_succeeded(
        error, parallel, f"writing checkpoint shard under {temp_dir} failed; {final_dir} was not written"
    )

    error = None
    if parallel.is_first_rank:
        try:
            _publish(temp_dir, final_dir, save_dir, token, tracker_text(iteration))
        except Exception as e:
            error = e
    _raise_unless_all_succeeded(error, parallel, f"moving {temp_dir} into place as {final_dir} failed")
    print_rank_0(parallel, f"  successfully saved checkpoint at iteration {iteration:7d} to {save_dir}")
    return final_dir


def _agree_on_token(save_dir: str, parallel: ParallelState) -> str:
    """Global rank 0 creates `save_dir`, removes debris and draws a token; every rank gets the token.

    If rank 0 cannot prepare `save_dir`, every rank raises CheckpointError with rank 0's reason.
    """
    box: list[Optional[str]] = [None, None]  # [token, error message]
    if parallel.is_first_rank:
        try:
            os.makedirs(save_dir, exist_ok=True)
            _remove_debris(save_dir)
            box[0] = uuid.uuid4().hex[:12]
        except OSError as e:
            box[1] = f"cannot prepare checkpoint dir {save_dir}: {e}"
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise CheckpointError(box[1])
    return box[0]


def _remove_debris(save_dir: str) -> None:
    """Delete temporary dirs/files of interrupted saves, and replaced `*.old-*` dirs whose successor exists.

    An `.old-` dir is kept when its checkpoint dir is missing: a crash between the two renames of a
    re-save left it as the only complete copy (load falls back to it).
    """
    for entry in os.listdir(save_dir):
        match = _DEBRIS_RE.fullmatch(entry)
        if match is None:
            continue
        path = os.path.join(save_dir, entry)
        if match.group(2) == "old" and not os.path.isdir(os.path.join(save_dir, match.group(1))):
            continue
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _write_file_atomically(obj: Any, path: str) -> None:
    """torch.save to `<path>.tmp`, fsync, rename to `path`, fsync the directory."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temp_path = path + ".tmp"
    with open(temp_path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp_path, path)
    _fsync_dir(os.path.dirname(path))


def _write_text_atomically(text: str, path: str, token: str) -> None:
    """Write `text` to `<path>.tmp-<token>`, fsync, rename to `path` (atomic on POSIX), fsync the directory."""
    temp_path = f"{path}.tmp-{token}"
    with open(temp_path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp_path, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    """Make a directory's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(temp_dir: str, final_dir: str, save_dir: str, token: str, tracker: str) -> None:
    """Rename the complete `temp_dir` to `final_dir` (replacing an older one), then point the tracker at it."""
    _fsync_dir(temp_dir)
    replaced = None
    if os.path.exists(final_dir):
        replaced = f"{final_dir}.old-{token}"
        os.rename(final_dir, replaced)
    os.rename(temp_dir, final_dir)
    _fsync_dir(save_dir)
    if replaced is not None:
        shutil.rmtree(replaced)
    _write_text_atomically(tracker, get_checkpoint_tracker_filename(save_dir), token)


def _raise_unless_all_succeeded(error: Optional[Exception], parallel: ParallelState, what: str) -> None:
    """All-reduce (MIN) a success flag over all ranks, which also acts as a barrier; raise on every rank if
    any rank failed: with its own exception chained on the failing rank."""
    all_ok = all_ranks(error is None)
    if error is not None:
        raise CheckpointError(f"{what}: {type(error).__name__}: {error}") from error
    if not all_ok:
        raise CheckpointError(f"{what}: another rank failed (see its error)")


# ---------------------------------------------------------------------------------------------- RNG


def _local_rng_state() -> dict[str, Any]:
    """This rank's python, numpy, torch (and CUDA) generator states and the TP RNG tracker's states."""
    state = {
        "random_rng_state": random.getstate(),
        "np_rng_state": np.random.get_state(),
        "torch_rng_state": torch.get_rng_state(),
        "rng_tracker_states": get_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def _gather_rng_states(parallel: ParallelState) -> list[dict[str, Any]]:
    """RNG states of all ranks of this rank's DP group, ordered by DP rank (all_gather_object)."""
    local = _local_rng_state()
    if parallel.dp_group is None:
        return [local]
    gathered: list[Any] = [None] * parallel.dp_size
    dist.all_gather_object(gathered, local, group=parallel.dp_group)
    return gathered


def _restore_rng_state(rng_state: list[dict[str, Any]], dp_rank: int) -> None:
    """Set all generators from entry `dp_rank` of a saved `rng_state` list (entry 0 if the list is shorter)."""
    state = rng_state[dp_rank] if dp_rank < len(rng_state) else rng_state[0]
    random.setstate(state["random_rng_state"])
    np.random.set_state(state["np_rng_state"])
    torch.set_rng_state(state["torch_rng_state"])
    if "cuda_rng_state" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    get_rng_tracker().set_states(state["rng_tracker_states"])


# ---------------------------------------------------------------------------------------------- load


def load_checkpoint(
    model: nn.Module,
    optimizer: Optional[Stateful],
    opt_param_scheduler: Optional[Stateful],
    load_dir: str,
    parallel: ParallelState,
    *,
    no_load_optim: bool = False,
    no_load_rng: bool = False,
    finetune: bool = False,
    strict: bool = True,
    run_args: Optional[argparse.Namespace] = None,
) -> tuple[int, Optional[argparse.Namespace]]:
    """Restore this rank's shard of the checkpoint the tracker in `load_dir` names; return (iteration, args).

    Returns (0, None) when `load_dir` has no tracker file (a fresh start). Restores the model (with
    `strict`), then, unless the checkpoint is a release or `finetune` is set, the optimizer and scheduler
    (unless `no_load_optim`) and the RNG states (unless `no_load_rng`). The iteration is 0 for a release
    or with `finetune`. Raises CheckpointError naming the path when the tracked dir or this rank's shard
    is missing or unreadable, when the TP sizes differ, or when the model does not match the shard; then,
    given this run's `run_args` (with its padded_vocab_size), the error names every model flag that
    differs from the checkpoint's saved args.
    """
    metadata = read_metadata(load_dir)
    if metadata is None:
        print_rank_0(
            parallel,
            f"WARNING: no checkpoint tracker {get_checkpoint_tracker_filename(load_dir)}; "
            "starting from randomly initialised weights",
        )
        return 0, None
    tracked_iteration, release = metadata
    checkpoint_dir = _existing_checkpoint_dir(load_dir, tracked_iteration, release)
    _check_grid_size(*count_shards(checkpoint_dir), parallel, checkpoint_dir)
    path = os.path.join(checkpoint_dir, _shard_dir(parallel), SHARD_FILENAME)
    print_rank_0(parallel, f"loading checkpoint from {load_dir} at iteration {tracked_iteration}")
    state = _load_file(path, mmap=False)
    checkpoint_args = state.get("args")
    if checkpoint_args is not None and hasattr(checkpoint_args, "tensor_model_parallel_size"):
        saved_pp = getattr(checkpoint_args, "pipeline_model_parallel_size", 1)
        _check_grid_size(checkpoint_args.tensor_model_parallel_size, saved_pp, parallel, path)
    _check_version(state, path)

    try:
        _load_model_states(model, state, strict)
    except (KeyError, RuntimeError) as e:
        differences = [] if run_args is None else model_flag_differences(checkpoint_args, run_args)
        if differences:
            raise CheckpointError(
                f"{path} holds a model of another shape: {'; '.join(differences)}; "
                "pass --use-checkpoint-args or matching flags"
            ) from None
        raise CheckpointError(f"{path}: the model does not match the checkpoint: {e}") from e

    restore_training_state = not (release or finetune)
    if restore_training_state and not no_load_optim:
        if (
            optimizer is not None
        ):  # reads distrib_optim.pt beside `path` when the distributed optimizer saved it
            load_optimizer_state(
                optimizer, _require(state, "optimizer", path, "--no-load-optim"), os.path.dirname(path)
            )
        if opt_param_scheduler is not None:
            opt_param_scheduler.load_state_dict(
                _require(state, "opt_param_scheduler", path, "--no-load-optim")
            )
    if restore_training_state and not no_load_rng:
        _restore_rng_state(_require(state, "rng_state", path, "--no-load-rng"), parallel.dp_rank)

    iteration = state["iteration"] if restore_training_state else 0
    what = "" if restore_training_state else " (model weights only; iteration counter reset to 0)"
    print_rank_0(
        parallel, f"  successfully loaded checkpoint from {load_dir} at iteration {tracked_iteration}{what}"
    )
    return iteration, checkpoint_args


def load_args_from_checkpoint(load_dir: str) -> argparse.Namespace:
    """The `args` saved in the latest checkpoint of `load_dir` (TP rank 0's file; tensors memory-mapped).

    For --use-checkpoint-args, generation and downstream tasks. Raises CheckpointError when there is no
    checkpoint or it holds no args.
    """
    metadata = read_metadata(load_dir)
    if metadata is None:
        raise CheckpointError(
            f"no checkpoint in {load_dir}: {get_checkpoint_tracker_filename(load_dir)} not found"
        )
    checkpoint_dir = _existing_checkpoint_dir(load_dir, *metadata)
    candidates = [os.path.join(checkpoint_dir, shard_dir_name(0, pp), SHARD_FILENAME) for pp in (None, 0)]
    path = next((p for p in candidates if os.path.isfile(p)), candidates[0])
    args = _load_file(path, mmap=True).get("args")
    if args is None:
        raise CheckpointError(
            f"{path} holds no 'args' (saved without arguments); pass the model flags explicitly"
        )
    return args


def _existing_checkpoint_dir(load_dir: str, iteration: int, release: bool) -> str:
    """The dir the tracker names, or the `.old-` copy left by a crash mid re-save; CheckpointError if neither."""
    checkpoint_dir = get_checkpoint_dir(load_dir, iteration, release)
    if os.path.isdir(checkpoint_dir):
        return checkpoint_dir
    name = os.path.basename(checkpoint_dir)
    replaced = sorted(
        (os.path.join(load_dir, e) for e in os.listdir(load_dir) if e.startswith(f"{name}.old-")),
        key=os.path.getmtime,
    )
    if replaced:
        return replaced[-1]
    raise CheckpointError(
        f"{get_checkpoint_tracker_filename(load_dir)} names {tracker_text(iteration, release)!r} "
        f"but {checkpoint_dir} does not exist"
    )


def _shard_dir(parallel: ParallelState) -> str:
    """`mp_rank_TT`, or `mp_rank_TT_PPP` under pipeline parallelism (Megatron's names)."""
    return shard_dir_name(parallel.tp_rank, parallel.pp_rank if parallel.pp_size > 1 else None)


def _model_states(model: nn.Module) -> dict[str, Any]:
    """{"model": nested state} or, for the v chunks of an interleaved pipeline stage (an nn.ModuleList),
    {"model0": .., "model1": ..} as Megatron writes them; each chunk numbers its layers from 0."""
    if isinstance(model, nn.ModuleList):
        return {f"model{i}": to_megatron_state_dict(chunk.state_dict()) for i, chunk in enumerate(model)}
    return {"model": to_megatron_state_dict(model.state_dict())}


def _load_model_states(model: nn.Module, state: dict[str, Any], strict: bool) -> None:
    """Inverse of `_model_states` (KeyError when the file holds another number of chunks)."""
    if isinstance(model, nn.ModuleList):
        for i, chunk in enumerate(model):
            chunk.load_state_dict(from_megatron_state_dict(state[f"model{i}"]), strict=strict)
    else:
        model.load_state_dict(from_megatron_state_dict(state["model"]), strict=strict)


def _check_grid_size(saved_tp: int, saved_pp: int, parallel: ParallelState, where: str) -> None:
    if saved_tp == 0:
        raise CheckpointError(f"{where}: no mp_rank_XX shard directories found")
    if (saved_tp, saved_pp) != (parallel.tp_size, parallel.pp_size):
        raise CheckpointError(
            f"{where} was saved with --tensor-model-parallel-size {saved_tp} x --pipeline-model-parallel-size "
            f"{saved_pp} but this run uses {parallel.tp_size} x {parallel.pp_size}; run with the saved sizes or "
            f"convert it: python tools/checkpoint/reshard.py --load CHECKPOINT --save NEW_DIR "
            f"--target-tensor-model-parallel-size {parallel.tp_size} "
            f"--target-pipeline-model-parallel-size {parallel.pp_size}"
        )


def _load_file(path: str, mmap: bool) -> dict[str, Any]:
    """torch.load a checkpoint file to CPU; weights_only=False because it holds an argparse.Namespace."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} not found (incomplete or corrupted checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # a truncated or foreign file: report which one
        raise CheckpointError(f"cannot read checkpoint file {path}: {type(e).__name__}: {e}") from e


def _check_version(state: dict[str, Any], path: str) -> None:
    """Versions >= 2.0 store QKV rows per head as [heads, 3, head_dim], the ordering our models use."""
    version = state.get("checkpoint_version", 0.0)
    if version < 2.0:
        raise CheckpointError(
            f"{path}: checkpoint_version {version} orders the QKV weights differently (< 2.0); "
            "convert it with Megatron-LM first"
        )


def _require(state: dict[str, Any], key: str, path: str, flag: str) -> Any:
    value = state.get(key)
    if value is None:
        raise CheckpointError(f"{path} holds no '{key}'; load it with {flag} (or --finetune)")
    return value
