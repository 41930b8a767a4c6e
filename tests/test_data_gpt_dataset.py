"""GPT samples, their cached indices, --split ranges, --data-path blends, and multi-rank cache building."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megatron.data import gpt_dataset, helpers
from megatron.data.dataset_utils import parse_data_path, split_boundaries
from megatron.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets
from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder


def write_positional_dataset(prefix: str, doc_lengths: list[int]) -> None:
    """Each token's id is its position in the .bin, so every token of the corpus is unique."""
    position = 0
    with IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32) as builder:
        for length in doc_lengths:
            builder.add_item(np.arange(position, position + length))
            builder.end_document()
            position += length
        builder.finalize(prefix + ".idx")


def doc_lengths(seed: int, n: int) -> list[int]:
    lengths = np.random.RandomState(seed).randint(0, 40, size=n)
    lengths[3] = 0  # an empty document must be skipped over
    return lengths.tolist()


def reference_samples(sizes, document_index, seq_length, num_samples):
    """Megatron's sample boundaries, walked token by token (the loop of Megatron's C++ helper)."""
    rows = [(0, 0)]
    position, offset = 0, 0
    for _ in range(num_samples):
        remaining = seq_length + 1
        while remaining:
            available = sizes[document_index[position]] - offset
            remaining -= available
            if remaining <= 0:
                offset += remaining + available - 1
                remaining = 0
            else:
                position, offset = position + 1, 0
        rows.append((position, offset))
    return np.array(rows)


@pytest.mark.parametrize("seq_length,num_samples", [(7, 1), (7, 60), (16, 200), (1, 30)])
def test_sample_index_matches_token_walk(seq_length, num_samples):
    sizes = np.array(doc_lengths(0, 25), dtype=np.int32)
    indices = helpers.build_gpt_indices(sizes, np.arange(25), num_samples, seq_length, seed=5)
    total = len(indices["sample_index"]) - 1
    assert total >= num_samples
    want = reference_samples(sizes, indices["document_index"], seq_length, total)
    np.testing.assert_array_equal(indices["sample_index"], want)
    np.testing.assert_array_equal(np.sort(indices["shuffle_index"]), np.arange(total))


def test_one_epoch_covers_every_token_once(tmp_path):
    lengths = doc_lengths(1, 40)
    seq_length = 8
    lengths[-1] += (seq_length + 1 - sum(lengths) % seq_length) % seq_length  # total = k * seq_length + 1
    prefix = str(tmp_path / "corpus")
    write_positional_dataset(prefix, lengths)
    indexed = IndexedDataset(prefix)
    num_samples = (sum(lengths) - 1) // seq_length
    dataset = GPTDataset("train", indexed, np.arange(len(lengths)), num_samples, seq_length, seed=1)
    assert len(dataset) == num_samples
    samples = [dataset[i]["text"] for i in range(len(dataset))]
    assert all(s.dtype == np.int64 and s.shape == (seq_length + 1,) for s in samples)
    inputs = np.concatenate([s[:-1] for s in samples])
    assert (
        np.unique(inputs).size == inputs.size == sum(lengths) - 1
    )  # each token starts-or-inside exactly once
    covered = np.union1d(inputs, [s[-1] for s in samples])
    np.testing.assert_array_equal(covered, np.arange(sum(lengths)))
    # Inside a sample, tokens follow their document: a jump only happens at a document boundary.
    starts = set(np.cumsum([0] + lengths).tolist())
    for s in samples:
        for a, b in zip(s[:-1], s[1:]):
            assert b == a + 1 or int(b) in starts


def test_split_documents_only(tmp_path):
    lengths = doc_lengths(2, 30)
    prefix = str(tmp_path / "corpus")
    write_positional_dataset(prefix, lengths)
    train, valid, test = build_train_valid_test_datasets([prefix], "20,10,0", (50, 30, 0), 5, seed=3)
    assert test is None
    bounds = np.cumsum([0] + lengths)
    for dataset, (lo, hi) in ((train, (0, 20)), (valid, (20, 30))):
        tokens = np.concatenate([dataset[i]["text"] for i in range(len(dataset))])
        assert tokens.min() >= bounds[lo] and tokens.max() < bounds[hi]
        assert len(dataset) >= (50 if dataset is train else 30)


def test_indices_deterministic_and_cached(tmp_path, monkeypatch):
    prefix = str(tmp_path / "corpus")
    write_positional_dataset(prefix, doc_lengths(3, 50))
    indexed = IndexedDataset(prefix)
    cache = str(tmp_path / "cache")
    first = GPTDataset("train", indexed, np.arange(50), 100, 6, seed=7, cache_dir=cache)
    files = sorted(os.listdir(cache))
    assert len([f for f in files if f.endswith(".npy")]) == 3
    mtimes = {f: os.path.getmtime(os.path.join(cache, f)) for f in files}

    def fail(*args, **kwargs):
        raise AssertionError("indices rebuilt although cached")

    monkeypatch.setattr(gpt_dataset, "build_gpt_indices", fail)
    second = GPTDataset("train", indexed, np.arange(50), 100, 6, seed=7, cache_dir=cache)
    assert {f: os.path.getmtime(os.path.join(cache, f)) for f in files} == mtimes
    for i in range(len(first)):
        np.testing.assert_array_equal(first[i]["text"], second[i]["text"])
    monkeypatch.undo()
    other_seed = GPTDataset("train", indexed, np.arange(50), 100, 6, seed=8, cache_dir=cache)
    assert len(os.listdir(cache)) == 2 * len(files)
    assert any(not np.array_equal(first[i]["text"], other_seed[i]["text"]) for i in range(len(first)))
    fresh = GPTDataset("train", indexed, np.arange(50), 100, 6, seed=7, cache_dir=str(tmp_path / "fresh"))
    for i in range(len(first)):
        np.testing.assert_array_equal(first[i]["text"], fresh[i]["text"])


def test_separate_last_epoch_rule():
    # 10 tokens per epoch, seq_length 1: 9 samples per epoch (one token is only a label).
    assert helpers.gpt_num_epochs(10, 1, 9) == 1
    assert helpers.gpt_num_epochs(10, 1, 10) == 2
    assert helpers.gpt_separate_last_epoch(2, 10, 1, 10)  # 1 sample from epoch 2 < 80% of 9
    assert not helpers.gpt_separate_last_epoch(2, 10, 1, 18)
    sizes = np.full(10, 1, dtype=np.int32)
    indices = helpers.build_gpt_indices(sizes, np.arange(10), 10, 1, seed=0)
    document_index = indices["document_index"]
    assert sorted(document_index[:10]) == list(range(10)) and sorted(document_index[10:]) == list(range(10))
    shuffle = indices["shuffle_index"]
    num_before_last = (10 - 1) // 1
    assert sorted(shuffle[:num_before_last]) == list(range(num_before_last))


def test_split_boundaries_rounding():
    assert split_boundaries("969,30,1", 1000) == [0, 969, 999, 1000]
    assert split_boundaries("1,1,1", 10) == [0, 4, 7, 10]  # 3+3+3 = 9: every boundary shifts by one
    assert split_boundaries("100", 17) == [0, 17, 17, 17]
    assert split_boundaries("98/2", 50) == [0, 49, 50, 50]
    with pytest.raises(ValueError, match="--split"):
        split_boundaries("a,b", 10)
    with pytest.raises(ValueError, match="--split"):
        split_boundaries("0,0,0", 10)


def test_parse_data_path():
    assert parse_data_path(["p"]) == (["p"], [1.0])
    assert parse_data_path(["3", "a", "1", "b"]) == (["a", "b"], [0.75, 0.25])
    with pytest.raises(ValueError, match="--data-path"):
        parse_data_path(["1", "a", "b"])
    with pytest.raises(ValueError, match="--data-path"):
        parse_data_path(["x", "a", "y", "b"])


def test_blended_data_path(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_positional_dataset(a, [30] * 20)
    write_positional_dataset(b, [30] * 20)
    with open(b + ".bin", "r+b") as f:  # make b's tokens distinguishable: negative ids
        tokens = np.fromfile(f, dtype=np.int32)
        f.seek(0)
        (-1 - tokens).astype(np.int32).tofile(f)
    train, valid, test = build_train_valid_test_datasets(["0.3", a, "0.7", b], "90,10,0", (400, 40, 0), 10, 0)
    assert test is None and len(train) == 400 and len(valid) == 40
    from_a = sum(int(train[i]["text"][0] >= 0) for i in range(len(train)))
    assert abs(from_a / 400 - 0.3) < 0.01


def test_missing_prefix_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere_text_document"):
        build_train_valid_test_datasets([str(tmp_path / "nowhere_text_document")], "1,0,0", (1, 0, 0), 4, 0)


def test_user_errors_are_clear(tmp_path):
    prefix = str(tmp_path / "corpus")
    write_positional_dataset(prefix, [5, 0, 0, 7])
    indexed = IndexedDataset(prefix)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    with pytest.raises(OSError, match="not_a_dir.*--data-cache-path"):
        GPTDataset("train", indexed, np.arange(4), 3, 2, seed=0, cache_dir=str(blocker / "cache"))
    with pytest.raises(ValueError, match="valid.*corpus.*empty"):
        GPTDataset("valid", indexed, np.array([1, 2]), 3, 2, seed=0)
