"""What GPT and BERT datasets share: `--split`, `--data-path` with weights, and train/valid/test assembly."""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

import numpy as np
from torch.utils.data import Dataset

from megatron.data.blended_dataset import BlendedDataset
from megatron.data.indexed_dataset import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")
OVERSAMPLING = 1.005  # each blended dataset is asked for 0.5% more samples than its share (Megatron)


def parse_split(splits_string: str) -> list[float]:
    """'969,30,1' (or '969/30/1', or fewer parts padded with 0) -> three weights normalised to sum to 1."""
    separator = "/" if "/" in splits_string else ","
    try:
        weights = [float(part) for part in splits_string.split(separator)]
    except ValueError:
        raise ValueError(f"--split {splits_string!r}: expected up to three numbers like 969,30,1") from None
    if len(weights) > 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"--split {splits_string!r}: expected up to three non-negative numbers with a positive sum"
        )
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    return [w / total for w in weights]


def split_boundaries(splits_string: str, size: int) -> list[int]:
    """Boundaries [0, b1, b2, size] of contiguous train/valid/test ranges of `size` items (Megatron's rule).

    b_{i+1} = b_i + round(weight_i * size) (Python's round), then every boundary after the first is shifted
    by the same amount so that the last one equals `size`.
    """
    boundaries = [0]
    for weight in parse_split(splits_string):
        boundaries.append(boundaries[-1] + int(round(weight * float(size))))
    excess = boundaries[-1] - size
    return [boundaries[0]] + [b - excess for b in boundaries[1:]]


def parse_data_path(data_prefix: list[str]) -> tuple[list[str], list[float]]:
    """--data-path as (prefixes, normalised weights): [prefix] or [w1, p1, w2, p2, ...]."""
    if len(data_prefix) == 1:
        return [data_prefix[0]], [1.0]
    if len(data_prefix) == 0 or len(data_prefix) % 2:
        raise ValueError(f"--data-path {' '.join(data_prefix)}: give one prefix, or weight-prefix pairs")
    try:
        weights = [float(w) for w in data_prefix[0::2]]
    except ValueError:
        raise ValueError(
            f"--data-path {' '.join(data_prefix)}: weights must be numbers (w1 p1 w2 p2 ...)"
        ) from None
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"--data-path {' '.join(data_prefix)}: weights must be non-negative with a positive sum"
        )
    total = sum(weights)
    return [p.strip() for p in data_prefix[1::2]], [w / total for w in weights]


def blended_num_samples(weight: float, num_samples: int) -> int:
    """Samples asked of one dataset of a blend: ceil(weight * num_samples * 1.005)."""
    return int(math.ceil(num_samples * weight * OVERSAMPLING))


def default_cache_dir(path_prefix: str, cache_dir: Optional[str]) -> str:
    """Where a dataset's indices are cached: `cache_dir`, or the directory holding the data."""
    return cache_dir if cache_dir is not None else os.path.dirname(os.path.abspath(path_prefix))


MakeDataset = Callable[[str, IndexedDataset, np.ndarray, int], Dataset]


def build_train_valid_test(
    data_prefix: list[str],
    splits_string: str,
    train_valid_test_num_samples: tuple[int, int, int],
    num_units: Callable[[IndexedDataset], int],
    make_dataset: MakeDataset,
) -> tuple[Optional[Dataset], Optional[Dataset], Optional[Dataset]]:
    """Split every dataset of --data-path into contiguous ranges of units, build each part, blend.

    `num_units(indexed)` is the number of items the split divides (GPT: sequences, BERT: documents);
    `make_dataset(split_name, indexed, unit_ids, num_samples)` builds one part. A part with no units is None;
    with several prefixes each split is a BlendedDataset of the non-empty parts, with their weights.
    """
    prefixes, weights = parse_data_path(data_prefix)
    parts: list[list[tuple[Dataset, float]]] = [[], [], []]
    for prefix, weight in zip(prefixes, weights):
        indexed = IndexedDataset(prefix)
        bounds = split_boundaries(splits_string, num_units(indexed))
        for i, name in enumerate(SPLIT_NAMES):
            if bounds[i + 1] <= bounds[i]:
                continue
            num_samples = train_valid_test_num_samples[i]
            if len(prefixes) > 1:
                num_samples = blended_num_samples(weight, num_samples)
            units = np.arange(bounds[i], bounds[i + 1], dtype=np.int32)
            parts[i].append((make_dataset(name, indexed, units, num_samples), weight))
    result: list[Optional[Dataset]] = []
    for i, split_parts in enumerate(parts):
        if not split_parts:
            result.append(None)
        elif len(prefixes) == 1:
            result.append(split_parts[0][0])
        else:
            datasets = [dataset for dataset, _ in split_parts]
            result.append(
                BlendedDataset(datasets, [w for _, w in split_parts], train_valid_test_num_samples[i])
            )
    return result[0], result[1], result[2]
