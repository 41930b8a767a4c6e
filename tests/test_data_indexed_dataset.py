"""The `.bin`/`.idx` builder and reader against an independent writer written from the format spec."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from megatron.data.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    best_fitting_dtype,
    data_file_path,
    index_file_path,
)

# Spec: .idx = magic b"MMIDIDX\x00\x00", <Q version 1, <B dtype code, <Q N sequences, <Q M = docs + 1,
# int32[N] sizes, int64[N] byte pointers into .bin, int64[M] document index starting at 0.
_SPEC_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6, np.float32: 7}
_SPEC_CODES[np.uint16] = 8


def reference_write(prefix: str, documents: list[list[list[int]]], dtype: type) -> None:
    """Minimal struct-based writer: `documents` is a list of documents, each a list of sequences."""
    itemsize = np.dtype(dtype).itemsize
    fmt = {1: "B", 2: "b", 3: "h", 4: "i", 5: "q", 6: "d", 7: "f", 8: "H"}[_SPEC_CODES[dtype]]
    sizes, pointers, doc_index = [], [], [0]
    position = 0
    with open(prefix + ".bin", "wb") as f:
        for document in documents:
            for sequence in document:
                f.write(struct.pack(f"<{len(sequence)}{fmt}", *sequence))
                sizes.append(len(sequence))
                pointers.append(position)
                position += len(sequence) * itemsize
            doc_index.append(len(sizes))
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00")
        f.write(struct.pack("<Q", 1))
        f.write(struct.pack("<B", _SPEC_CODES[dtype]))
        f.write(struct.pack("<Q", len(sizes)))
        f.write(struct.pack("<Q", len(doc_index)))
        f.write(struct.pack(f"<{len(sizes)}i", *sizes))
        f.write(struct.pack(f"<{len(pointers)}q", *pointers))
        f.write(struct.pack(f"<{len(doc_index)}q", *doc_index))


def random_documents(seed: int, n_docs: int, high: int) -> list[list[list[int]]]:
    rng = np.random.RandomState(seed)
    return [
        [rng.randint(0, high, size=rng.randint(0, 12)).tolist() for _ in range(rng.randint(1, 5))]
        for _ in range(n_docs)
    ]


def build(prefix: str, documents: list[list[list[int]]], dtype: type, use_add_document: bool) -> None:
    with IndexedDatasetBuilder(data_file_path(prefix), dtype=dtype) as builder:
        for i, document in enumerate(documents):
            if use_add_document:
                builder.add_document(sum(document, []), [len(s) for s in document])
            else:
                for sequence in document:  # alternate input types: list, numpy, torch
                    builder.add_item([sequence, np.array(sequence), torch.tensor(sequence)][i % 3])
                builder.end_document()
        builder.finalize(index_file_path(prefix))


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
@pytest.mark.parametrize("use_add_document", [False, True])
def test_builder_matches_reference_bytes(tmp_path, dtype, use_add_document):
    documents = random_documents(0, 20, high=250)
    build(str(tmp_path / "ours"), documents, dtype, use_add_document)
    reference_write(str(tmp_path / "ref"), documents, dtype)
    for suffix in (".bin", ".idx"):
        assert read_bytes(str(tmp_path / ("ours" + suffix))) == read_bytes(str(tmp_path / ("ref" + suffix)))
    assert sorted(os.listdir(tmp_path)) == ["ours.bin", "ours.idx", "ref.bin", "ref.idx"]  # no temp left


def test_reader_reads_reference_files(tmp_path):
    documents = random_documents(1, 30, high=60000)
    prefix = str(tmp_path / "ref")
    reference_write(prefix, documents, np.uint16)
    dataset = IndexedDataset(prefix)
    sequences = [s for d in documents for s in d]
    assert dataset.dtype == np.uint16
    assert len(dataset) == len(sequences)
    assert dataset.num_documents == len(documents)
    assert dataset.sequence_lengths.dtype == np.int32 and dataset.document_indices.dtype == np.int64
    np.testing.assert_array_equal(dataset.sequence_lengths, [len(s) for s in sequences])
    np.testing.assert_array_equal(dataset.document_indices, np.cumsum([0] + [len(d) for d in documents]))
    for i, sequence in enumerate(sequences):
        np.testing.assert_array_equal(dataset[i], sequence)
    np.testing.assert_array_equal(dataset[-1], sequences[-1])
    sliced = dataset[3:9]
    assert len(sliced) == 6
    for got, want in zip(sliced, sequences[3:9]):
        np.testing.assert_array_equal(got, want)
    longest = int(np.argmax(dataset.sequence_lengths))
    np.testing.assert_array_equal(dataset.get(longest, offset=2, length=3), sequences[longest][2:5])
    np.testing.assert_array_equal(dataset.get(longest, offset=4), sequences[longest][4:])
    with pytest.raises(IndexError):
        dataset.get(longest, offset=1, length=len(sequences[longest]))
    with pytest.raises(IndexError):
        dataset[len(dataset)]


def test_add_index_merge_equals_writing_all(tmp_path):
    parts = [random_documents(seed, 7, high=1000) for seed in (2, 3, 4)]
    for k, documents in enumerate(parts):
        build(str(tmp_path / f"part{k}"), documents, np.uint16, use_add_document=True)
    with IndexedDatasetBuilder(str(tmp_path / "merged.bin"), dtype=np.uint16) as builder:
        for k in range(len(parts)):
            builder.add_index(str(tmp_path / f"part{k}"))
        builder.finalize(str(tmp_path / "merged.idx"))
    reference_write(str(tmp_path / "all"), sum(parts, []), np.uint16)
    for suffix in (".bin", ".idx"):
        assert read_bytes(str(tmp_path / ("merged" + suffix))) == read_bytes(str(tmp_path / ("all" + suffix)))


def test_merge_refuses_other_dtype(tmp_path):
    build(str(tmp_path / "a"), random_documents(5, 3, high=100), np.int32, use_add_document=True)
    with IndexedDatasetBuilder(str(tmp_path / "b.bin"), dtype=np.uint16) as builder:
        with pytest.raises(ValueError, match="dtype"):
            builder.add_index(str(tmp_path / "a"))
        builder.abort()


def test_exception_in_with_block_leaves_no_files(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.uint16) as builder:
            builder.add_item([1, 2, 3])
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_ids_that_do_not_fit_are_refused(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "x.bin"), dtype=np.uint16) as builder:
        with pytest.raises(ValueError, match="do not fit"):
            builder.add_item([1, 70000])
        with pytest.raises(ValueError, match="sum to"):
            builder.add_document([1, 2, 3], [1, 1])
        builder.abort()
    assert os.listdir(tmp_path) == []


def test_missing_files_name_the_prefix(tmp_path):
    prefix = str(tmp_path / "corpus_text_document")
    with pytest.raises(FileNotFoundError, match="corpus_text_document"):
        IndexedDataset(prefix)
    reference_write(prefix, [[[1, 2]]], np.int32)
    os.remove(prefix + ".bin")
    with pytest.raises(FileNotFoundError, match=r"corpus_text_document\.bin"):
        IndexedDataset(prefix)


def test_truncated_bin_is_reported(tmp_path):
    prefix = str(tmp_path / "d")
    reference_write(prefix, [[[1, 2, 3, 4]]], np.int32)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(8)
    with pytest.raises(ValueError, match=r"d\.bin"):
        IndexedDataset(prefix)


def test_pickle_reopens_and_empty_dataset(tmp_path):
    prefix = str(tmp_path / "d")
    reference_write(prefix, [[[7, 8, 9]], [[1]]], np.int32)
    clone = pickle.loads(pickle.dumps(IndexedDataset(prefix)))
    np.testing.assert_array_equal(clone[0], [7, 8, 9])
    empty = str(tmp_path / "empty")
    with IndexedDatasetBuilder(empty + ".bin", dtype=np.int32) as builder:
        builder.finalize(empty + ".idx")
    dataset = IndexedDataset(empty)
    assert len(dataset) == 0 and dataset.num_documents == 0


def test_best_fitting_dtype():
    assert best_fitting_dtype(50257) is np.uint16
    assert best_fitting_dtype(65500) is np.int32
    assert best_fitting_dtype(None) is np.int32
