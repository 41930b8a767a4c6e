"""Megatron-LM's classic checkpoint layout: file names, the tracker file, and the nested model dict.

On disk (checkpoint_version 3.0, as written by Megatron-LM and read by its converters)::

    <dir>/latest_checkpointed_iteration.txt        the last complete iteration, as text ("100"), or "release"
    <dir>/iter_0000100/mp_rank_00/model_optim_rng.pt   one file per tensor-parallel rank (7-digit iteration)
    <dir>/iter_0000100/mp_rank_01_002/...            the form with a pipeline rank, used when pp > 1; each
                                                    stage numbers its layers from 0, and a last stage
                                                    without the embedding stores `word_embeddings_for_head`
    <dir>/release/mp_rank_00/model_optim_rng.pt     a "release" checkpoint (weights to start from, no iteration)

Each file is a torch.save'd dict: `args` (argparse.Namespace), `checkpoint_version` (3.0), `iteration`,
`model`, `optimizer`, `opt_param_scheduler`, `rng_state`. `model` is Megatron's NESTED dict, which this
module converts to and from the FLAT `state_dict()` of our models:

    flat key                                                   nested location
    language_model.embedding.word_embeddings.weight            model["language_model"]["embedding"]["word_embeddings"]["weight"]
    language_model.encoder.layers.0.input_layernorm.weight     model["language_model"]["encoder"]["layers.0.input_layernorm.weight"]
    language_model.pooler.dense.weight                         model["language_model"]["pooler"]["dense.weight"]
    lm_head.layernorm.bias                                     model["lm_head"]["layernorm.bias"]
    binary_head.weight                                         model["binary_head"]["weight"]

i.e. under `language_model.embedding` the next name is one more dict level; elsewhere under
`language_model` one level per component; any other prefix is one level. Whatever follows stays a
dotted key. Going back is joining the nested keys with dots.

This module does no communication; `megatron.checkpointing` writes and reads these files.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, Optional, Union

import numpy as np
from torch import Tensor

CHECKPOINT_VERSION = 3.0
TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
SHARD_FILENAME = "model_optim_rng.pt"
RELEASE = "release"

_SHARD_DIR_RE = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?")

NestedStateDict = dict[str, Union[Tensor, "NestedStateDict"]]


class CheckpointError(Exception):
    """A checkpoint cannot be written or read as asked; the message names the path and what to do."""


def get_checkpoint_tracker_filename(checkpoints_dir: str) -> str:
    """`<checkpoints_dir>/latest_checkpointed_iteration.txt`."""
    return os.path.join(checkpoints_dir, TRACKER_FILENAME)


def get_checkpoint_dir(checkpoints_dir: str, iteration: int, release: bool = False) -> str:
    """`<checkpoints_dir>/iter_0000100` (7-digit, zero-padded iteration), or `<checkpoints_dir>/release`."""
    return os.path.join(checkpoints_dir, RELEASE if release else f"iter_{iteration:07d}")


def shard_dir_name(tp_rank: int, pp_rank: Optional[int] = None) -> str:
    """`mp_rank_01` for tensor-parallel rank 1, or `mp_rank_01_002` with pipeline rank 2."""
    return f"mp_rank_{tp_rank:02d}" if pp_rank is None else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def get_checkpoint_name(
    checkpoints_dir: str, iteration: int, tp_rank: int, pp_rank: Optional[int] = None, release: bool = False
) -> str:
    """Path of one rank's file: `<dir>/iter_0000100/mp_rank_00/model_optim_rng.pt` (see module docstring)."""
    return os.path.join(
        get_checkpoint_dir(checkpoints_dir, iteration, release),
        shard_dir_name(tp_rank, pp_rank),
        SHARD_FILENAME,
    )


def read_metadata(checkpoints_dir: str) -> Optional[tuple[int, bool]]:
    """Read the tracker file: `(iteration, release)`, `(0, True)` for "release", None when there is no tracker.

    Raises CheckpointError when the tracker holds neither a non-negative integer nor "release".
    """
    tracker = get_checkpoint_tracker_filename(checkpoints_dir)
    if not os.path.isfile(tracker):
        return None
    with open(tracker, encoding="utf-8") as f:
        text = f.read().strip()
    if text == RELEASE:
        return 0, True
    if not text.isdigit():
        raise CheckpointError(
            f"{tracker}: expected an iteration number or '{RELEASE}', found {text!r}; fix or delete the file"
        )
    return int(text), False


def tracker_text(iteration: int, release: bool = False) -> str:
    """What the tracker file holds for this checkpoint: `str(iteration)` (no newline), or "release"."""
    return RELEASE if release else str(iteration)


def count_tensor_parallel_shards(checkpoint_dir: str) -> int:
    """Number of distinct tensor-parallel ranks among the `mp_rank_XX[_YYY]` directories of a checkpoint."""
    return count_shards(checkpoint_dir)[0]


def count_shards(checkpoint_dir: str) -> tuple[int, int]:
    """(tensor-parallel size, pipeline-parallel size) of a checkpoint from its `mp_rank_XX[_YYY]` dirs
    (pipeline size 1 for the form without `_YYY`)."""
    tp_ranks, pp_ranks = set(), set()
    for entry in os.listdir(checkpoint_dir):
        match = _SHARD_DIR_RE.fullmatch(entry)
        if match and os.path.isdir(os.path.join(checkpoint_dir, entry)):
            tp_ranks.add(int(match.group(1)))
            pp_ranks.add(int(match.group(2) or 0))
    return len(tp_ranks), len(pp_ranks)


def _nesting_depth(parts: list[str]) -> int:
    """How many leading name components of a flat key become dict levels (see module docstring)."""
    if parts[0] == "language_model":
        return 3 if len(parts) > 1 and parts[1] == "embedding" else 2
    return 1


def to_megatron_state_dict(flat: dict[str, Tensor]) -> NestedStateDict:
    """Flat `model.state_dict()` -> Megatron's nested `model` dict (table in the module docstring).

    A key is split into at most `depth` dict levels (3 under language_model.embedding, 2 elsewhere under
    language_model, 1 otherwise) and the dotted remainder, which stays one key; a key without a dot stays
    at the top level. Raises ValueError if a key is both a tensor and a prefix of another key.
    """
    nested: NestedStateDict = {}
    for key, tensor in flat.items():
        parts = key.split(".")
        depth = min(_nesting_depth(parts), len(parts) - 1)
        node = nested
        for level in parts[:depth]:
            child = node.setdefault(level, {})
            if not isinstance(child, dict):
                raise ValueError(f"state-dict key {key!r}: {level!r} is both a tensor and a module prefix")
            node = child
        leaf = ".".join(parts[depth:])
        if leaf in node:
            raise ValueError(f"state-dict key {key!r} collides with another key in the nested layout")
        node[leaf] = tensor
    return nested


def from_megatron_state_dict(nested: NestedStateDict) -> dict[str, Tensor]:
    """Megatron's nested `model` dict -> flat `state_dict()` keys: nested keys joined with dots.

    Older Megatron-LM checkpoints name the transformer stack `language_model.transformer`; it is read as
    `language_model.encoder` (the name since checkpoint_version 3.0 and in our models).
    """
    flat: dict[str, Tensor] = {}

    def visit(prefix: str, node: NestedStateDict) -> None:
        for key, value in node.items():
            if prefix == "language_model." and key == "transformer":
                key = "encoder"
            name = prefix + key
            if isinstance(value, dict):
                visit(name + ".", value)
            else:
                flat[name] = value

    visit("", nested)
    return flat


def weights_only_safe_globals() -> list[Any]:
    """The non-tensor types in our checkpoint files, for `torch.load(..., weights_only=True)` readers.

    The files hold an argparse.Namespace (`args`) and numpy's RNG state (`rng_state[i]["np_rng_state"]`),
    as Megatron-LM's do; readers that load with weights_only=True (e.g. Hugging Face's Megatron
    converters) need `with torch.serialization.safe_globals(weights_only_safe_globals()): ...`.
    """
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy's array unpickling function (module moved in numpy 2)
    return [argparse.Namespace, np.ndarray, np.dtype, type(np.dtype(np.uint32)), reconstruct]
