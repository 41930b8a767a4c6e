"""Cache of dataset indices as `.npy` files, keyed by a hash of everything that determines them.

`load_or_build(cache_dir, stem, description, build)` returns the arrays named by `build()`'s keys, loaded
(memory-mapped) from `{cache_dir}/{stem}_{md5(description)}_{name}.npy`. When one is missing, `build()` runs
and each array is written under a temporary name then renamed, so a crash never leaves a partial file under
the final name; `{...}_description.json` records what the hash stands for.

With torch.distributed initialised, only global rank 0 builds; the others wait at a barrier, then load
(`cache_dir` must then be on a filesystem every rank sees). Every rank must call this, in the same order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Callable

import numpy as np
import torch.distributed as dist

logger = logging.getLogger(__name__)


def description_hash(description: dict[str, Any]) -> str:
    """md5 of the description as canonical JSON."""
    return hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()


def array_digest(array: np.ndarray) -> str:
    """md5 of an array's bytes, to put an array (e.g. the document ids of a split) into a description."""
    return hashlib.md5(np.ascontiguousarray(array).tobytes()).hexdigest()


def _save_atomically(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def _write_cache(
    cache_dir: str,
    paths: dict[str, str],
    description: dict[str, Any],
    build: Callable[[], dict[str, np.ndarray]],
    stem: str,
) -> None:
    start = time.perf_counter()
    arrays = build()
    if set(arrays) != set(paths):
        raise ValueError(f"index builder returned {sorted(arrays)}, expected {sorted(paths)}")
    description_path = os.path.join(cache_dir, f"{stem}_description.json")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        for name, array in arrays.items():
            _save_atomically(paths[name], array)
        tmp = f"{description_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(description, f, indent=2, sort_keys=True)
        os.replace(tmp, description_path)
    except OSError as error:
        raise OSError(
            f"cannot write dataset indices under {cache_dir} ({error}); set --data-cache-path"
        ) from None
    logger.info("built %s indices in %.2f s under %s", stem, time.perf_counter() - start, cache_dir)


def load_or_build(
    cache_dir: str,
    stem: str,
    description: dict[str, Any],
    names: list[str],
    build: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Arrays `names` for `description`: loaded from the cache, or built by `build()` and cached first."""
    key = f"{stem}_{description_hash(description)}"
    paths = {name: os.path.join(cache_dir, f"{key}_{name}.npy") for name in names}
    distributed = dist.is_available() and dist.is_initialized()
    builds = not distributed or dist.get_rank() == 0
    if builds and not all(os.path.isfile(path) for path in paths.values()):
        try:
            _write_cache(cache_dir, paths, description, build, key)
        finally:
            if distributed:  # release the other ranks even when building failed
                dist.barrier()
    elif distributed:
        dist.barrier()
    missing = [path for path in paths.values() if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"rank 0 did not build the dataset indices {missing} (see rank 0's error)")
    return {name: np.load(path, mmap_mode="r", allow_pickle=False) for name, path in paths.items()}
