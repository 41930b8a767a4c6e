"""GPT pretraining samples: `seq_length + 1` consecutive tokens of shuffled documents, no padding.

The documents of a split are repeated over enough epochs and shuffled; their tokens are read in that order
as one stream, and sample i is stream tokens [i * seq_length, (i + 1) * seq_length] (inputs are the first
seq_length, labels the last seq_length). A sample runs across document boundaries. The order of samples
is shuffled too. See megatron/data/helpers.py for how the three indices are built (with Megatron's
"separate last epoch" rule, so the same seed gives Megatron-LM's indices), and index_cache.py for caching.

In a `_text_document` dataset every document is one sequence, so "document" d is sequence d here.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
from torch.utils.data import Dataset

from megatron.data.dataset_utils import build_train_valid_test, default_cache_dir
from megatron.data.helpers import build_gpt_indices
from megatron.data.index_cache import array_digest, load_or_build
from megatron.data.indexed_dataset import IndexedDataset

INDEX_NAMES = ["document_index", "sample_index", "shuffle_index"]


class GPTDataset(Dataset):
    """`dataset[i]` -> {"text": np.int64 array of seq_length + 1 tokens}.

    `documents` are the document (sequence) ids of this split; `num_samples` the samples asked for (the
    dataset holds every sample of the whole epochs needed, so len(dataset) >= num_samples). Indices are
    cached under `cache_dir` (default: beside the data), keyed by a hash of these parameters.
    """

    def __init__(
        self,
        name: str,
        indexed_dataset: IndexedDataset,
        documents: np.ndarray,
        num_samples: int,
        seq_length: int,
        seed: int,
        cache_dir: Optional[str] = None,
    ) -> None:
        if seq_length < 1 or num_samples < 0:
            raise ValueError(f"GPTDataset {name}: need seq_length >= 1 and num_samples >= 0")
        documents = np.asarray(documents, dtype=np.int32)
        if documents.size == 0:
            raise ValueError(
                f"GPTDataset {name}: no documents in this split of {indexed_dataset.path_prefix}"
            )
        if documents.min() < 0 or documents.max() >= len(indexed_dataset):
            raise ValueError(f"GPTDataset {name}: document ids outside [0, {len(indexed_dataset)})")
        if not indexed_dataset.sequence_lengths[documents].any():
            raise ValueError(
                f"GPTDataset {name}: the documents of this split of {indexed_dataset.path_prefix} are empty"
            )
        self.name = name
        self.indexed_dataset = indexed_dataset
        self.seq_length = seq_length
        description = {
            "class": "GPTDataset",
            "path_prefix": os.path.abspath(indexed_dataset.path_prefix),
            "num_sequences": len(indexed_dataset),
            "documents_md5": array_digest(documents),
            "num_samples": num_samples,
            "seq_length": seq_length,
            "seed": seed,
        }
        stem = f"{os.path.basename(indexed_dataset.path_prefix)}_{name}_gpt"
        indices = load_or_build(
            default_cache_dir(indexed_dataset.path_prefix, cache_dir),
            stem,
            description,
            INDEX_NAMES,
            lambda: build_gpt_indices(
                indexed_dataset.sequence_lengths, documents, num_samples, seq_length, seed
            ),
        )
        self.document_index = indices["document_index"]
        self.sample_index = indices["sample_index"]
        self.shuffle_index = indices["shuffle_index"]

    def __len__(self) -> int:
        return int(self.sample_index.shape[0]) - 1

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        k = int(self.shuffle_index[idx])
        first, first_offset = (int(v) for v in self.sample_index[k])
        last, last_offset = (int(v) for v in self.sample_index[k + 1])
        if first == last:
            tokens = self.indexed_dataset.get(
                int(self.document_index[first]), offset=first_offset, length=last_offset - first_offset + 1
            )
            return {"text": tokens.astype(np.int64)}
        parts = [self.indexed_dataset.get(int(self.document_index[first]), offset=first_offset)]
        parts += [self.indexed_dataset.get(int(self.document_index[j])) for j in range(first + 1, last)]
        parts.append(self.indexed_dataset.get(int(self.document_index[last]), length=last_offset + 1))
        return {"text": np.concatenate(parts).astype(np.int64)}


def build_train_valid_test_datasets(
    data_prefix: list[str],
    splits_string: str,
    train_valid_test_num_samples: tuple[int, int, int],
    seq_length: int,
    seed: int,
    cache_dir: Optional[str] = None,
) -> tuple[Optional[Dataset], Optional[Dataset], Optional[Dataset]]:
    """GPT (train, valid, test) from --data-path, --split, sample counts; None for an empty split.

    `data_prefix` is [prefix] or [w1, p1, w2, p2, ...]: each prefix's documents are split into contiguous
    ranges by `splits_string` (e.g. "969,30,1"), and with several prefixes each split is a BlendedDataset.
    """

    def make_dataset(name: str, indexed: IndexedDataset, documents: np.ndarray, num_samples: int) -> Dataset:
        return GPTDataset(name, indexed, documents, num_samples, seq_length, seed, cache_dir)

    return build_train_valid_test(data_prefix, splits_string, train_valid_test_num_samples, len, make_dataset)
