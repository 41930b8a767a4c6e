"""A weighted mixture of datasets, in the deterministic order of Megatron's greedy blending rule."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from megatron.data.blending import build_blending_indices


class BlendedDataset(Dataset):
    """`size` samples drawn from `datasets` in proportion to `weights` (normalised here).

    Sample i is sample dataset_sample_index[i] of datasets[dataset_index[i]], where sample i goes to the
    dataset furthest behind its target share: argmax_k (w_k * max(i, 1) - samples already taken from k).
    After n samples every dataset has contributed w_k * n samples to within one.
    """

    def __init__(self, datasets: Sequence[Dataset], weights: Sequence[float], size: int) -> None:
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(
                f"BlendedDataset needs one weight per dataset, got {len(datasets)} and {len(weights)}"
            )
        if len(datasets) > np.iinfo(np.int16).max:
            raise ValueError(f"cannot blend more than {np.iinfo(np.int16).max} datasets")
        weights_array = np.asarray(weights, dtype=np.float64)
        if (weights_array < 0).any() or weights_array.sum() <= 0:
            raise ValueError(
                f"blending weights must be non-negative with a positive sum, got {list(weights)}"
            )
        self.datasets = list(datasets)
        self.weights = weights_array / weights_array.sum()
        self.size = size
        self.dataset_index, self.dataset_sample_index = build_blending_indices(self.weights, size)
        needed = np.bincount(self.dataset_index, minlength=len(self.datasets))  # samples 0..needed-1 of each
        for k, dataset in enumerate(self.datasets):
            if needed[k] > len(dataset):  # type: ignore[arg-type]
                raise ValueError(
                    f"blended dataset {k} has {len(dataset)} samples but the blend needs {needed[k]}"
                )  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int) -> Any:
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]
