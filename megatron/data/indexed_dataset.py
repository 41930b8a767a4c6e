"""Megatron-LM's memory-mapped indexed dataset: a `.bin` of token ids and an `.idx` describing them.

A dataset is a list of *sequences* (a whole document for GPT, one sentence for BERT) grouped into
*documents*. Two files share a path prefix:

`{prefix}.bin`: the token ids of every sequence back to back, in the dataset dtype, no header.

`{prefix}.idx`, little-endian, byte-compatible with Megatron-LM's `MMapIndexedDataset`:

    offset  type          field
    0       9 bytes       magic  b"MMIDIDX\\x00\\x00"
    9       <Q            version, always 1
    17      <B            dtype code (see DTYPE_CODES)
    18      <Q            N, number of sequences
    26      <Q            M, number of documents + 1
    34      int32[N]      sequence lengths, in tokens
    34+4N   int64[N]      sequence pointers: byte offset of each sequence in `.bin`
    34+12N  int64[M]      document indices: document d holds sequences [doc[d], doc[d+1]); doc[0] = 0

Pointers are the exclusive prefix sum of `lengths * itemsize`, so they are implied by the lengths.
"""

from __future__ import annotations

import os
import shutil
import struct
from types import TracebackType
from typing import Any, Optional, Union

import numpy as np

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, N sequences, M document indices

DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


def dtype_code(dtype: Any) -> int:
    """The `.idx` code of a numpy dtype (raises ValueError for a dtype the format does not have)."""
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == np.dtype(dtype):
            return code
    raise ValueError(
        f"dtype {np.dtype(dtype)} cannot be stored in an indexed dataset; use one of {DTYPE_CODES}"
    )


def best_fitting_dtype(vocab_size: Optional[int]) -> type:
    """uint16 when every token id fits (vocabulary under 65500 tokens, Megatron's rule), else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.uint16
    return np.int32


def data_file_path(prefix: str) -> str:
    """The `.bin` path of a dataset prefix."""
    return prefix + ".bin"


def index_file_path(prefix: str) -> str:
    """The `.idx` path of a dataset prefix."""
    return prefix + ".idx"


def _as_array(ids: Any, dtype: np.dtype) -> np.ndarray:
    """Token ids (list, numpy array or torch tensor) as a 1-D array of `dtype`; refuse ids that do not fit."""
    if hasattr(ids, "detach"):  # a torch tensor (torch is not imported here: tools start faster without it)
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids)
    if array.ndim != 1:
        raise ValueError(f"a sequence must be 1-D, got shape {array.shape}")
    if array.size and np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            raise ValueError(f"token ids in [{low}, {high}] do not fit in {dtype}; choose a wider dtype")
    return array.astype(dtype, copy=False)


class IndexedDatasetBuilder:
    """Writes a `.bin`/`.idx` pair. Data goes to temporary files; `finalize` renames both into place.

    Usage:
        with IndexedDatasetBuilder(data_file_path(prefix), dtype=np.uint16) as builder:
            for document in documents:
                builder.add_document(np.concatenate(document), [len(s) for s in document])
            builder.finalize(index_file_path(prefix))

    Leaving the `with` block on an exception or without `finalize` (or calling `abort()`) deletes the
    temporary files, so an interrupted run never leaves a partial dataset under the final names.
    """

    def __init__(self, bin_path: str, dtype: Any = np.int32) -> None:
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)  # validate early
        self._tmp_bin = f"{bin_path}.tmp{os.getpid()}"
        self._tmp_idx: Optional[str] = None
        self._file = open(self._tmp_bin, "wb")  # noqa: SIM115 - closed by finalize/abort
        self._lengths: list[int] = []
        self._document_indices: list[int] = [0]

    def add_item(self, ids: Any) -> None:
        """Append one sequence. Call `end_document` after the last sequence of a document."""
        array = _as_array(ids, self.dtype)
        self._file.write(array.tobytes(order="C"))
        self._lengths.append(int(array.size))

    def add_document(self, ids: Any, lengths: list[int]) -> None:
        """Append one document made of several sequences, then end the document (Megatron-core's semantics).

        `ids` are the tokens of all sequences concatenated; `lengths` their lengths (summing to len(ids)).
        """
        array = _as_array(ids, self.dtype)
        lengths = [int(n) for n in lengths]
        if sum(lengths) != array.size:
            raise ValueError(
                f"sequence lengths sum to {sum(lengths)} but the document has {array.size} tokens"
            )
        self._file.write(array.tobytes(order="C"))
        self._lengths.extend(lengths)
        self.end_document()

    def end_document(self) -> None:
        """Close the current document: the sequences added since the previous call form one document."""
        self._document_indices.append(len(self._lengths))

    def add_index(self, path_prefix: str) -> None:
        """Append every sequence and document of the existing dataset at `path_prefix` (same dtype)."""
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise ValueError(
                f"cannot merge {path_prefix}: its dtype is {other.dtype}, the builder's is {self.dtype}"
            )
        offset = len(self._lengths)
        self._lengths.extend(other.sequence_lengths.tolist())
        self._document_indices.extend((offset + other.document_indices[1:]).tolist())
        del other
        with open(data_file_path(path_prefix), "rb") as source:
            shutil.copyfileobj(source, self._file, length=1 << 24)

    def finalize(self, idx_path: str) -> None:
        """Write the index to a temporary name, then rename `.bin` and `.idx` into place."""
        self._file.close()
        self._tmp_idx = f"{idx_path}.tmp{os.getpid()}"
        write_index(self._tmp_idx, self.dtype, np.asarray(self._lengths), np.asarray(self._document_indices))
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, idx_path)
        self._tmp_idx = None

    def abort(self) -> None:
        """Close and delete the temporary files; nothing is left under the final names."""
        self._file.close()
        for path in (self._tmp_bin, self._tmp_idx):
            if path is not None and os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        traceback: Optional[TracebackType],
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._file.closed:  # left without finalize: keep nothing half-written
            self.abort()


def write_index(idx_path: str, dtype: Any, lengths: np.ndarray, document_indices: np.ndarray) -> None:
    """Write an `.idx` file for sequences of `lengths` tokens grouped by `document_indices` (see module doc)."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int64)
    pointers = np.zeros(lengths.size, dtype=np.int64)
    np.cumsum(lengths[:-1] * dtype.itemsize, out=pointers[1:])
    with open(idx_path, "wb") as f:
        f.write(_HEADER.pack(_MAGIC, _VERSION, dtype_code(dtype), lengths.size, len(document_indices)))
        f.write(lengths.astype("<i4").tobytes(order="C"))
        f.write(pointers.astype("<i8").tobytes(order="C"))
        f.write(np.asarray(document_indices).astype("<i8").tobytes(order="C"))


class IndexedDataset:
    """Memory-mapped reader of a `.bin`/`.idx` pair written by this module or by Megatron-LM.

    `dataset[i]` is sequence i as a numpy array of the dataset dtype; `dataset[a:b]` a list of arrays (one
    per sequence, as in Megatron); `get(i, offset, length)` reads part of a sequence without touching the rest.
    """

    def __init__(self, path_prefix: str) -> None:
        self.path_prefix = path_prefix
        for path in (index_file_path(path_prefix), data_file_path(path_prefix)):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"indexed dataset '{path_prefix}': missing file {path}")
        self._open()

    def _open(self) -> None:
        idx_path = index_file_path(self.path_prefix)
        with open(idx_path, "rb") as f:
            header = f.read(_HEADER.size)
        if len(header) < _HEADER.size or header[:9] != _MAGIC:
            raise ValueError(f"{idx_path} is not an indexed-dataset index (bad magic; expected MMIDIDX)")
        _, version, code, n_sequences, n_doc_indices = _HEADER.unpack(header)
        if version != _VERSION:
            raise ValueError(f"{idx_path}: index version {version} is not supported (only {_VERSION})")
        if code not in DTYPE_CODES:
            raise ValueError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + 12 * n_sequences + 8 * n_doc_indices
        if os.path.getsize(idx_path) != expected:
            raise ValueError(f"{idx_path}: size {os.path.getsize(idx_path)} bytes, header implies {expected}")
        self._index = np.memmap(idx_path, dtype=np.uint8, mode="r")
        start = _HEADER.size
        self.sequence_lengths = np.frombuffer(self._index, dtype="<i4", count=n_sequences, offset=start)
        start += 4 * n_sequences
        self.sequence_pointers = np.frombuffer(self._index, dtype="<i8", count=n_sequences, offset=start)
        start += 8 * n_sequences
        self.document_indices = np.frombuffer(self._index, dtype="<i8", count=n_doc_indices, offset=start)
        bin_path = data_file_path(self.path_prefix)
        total_bytes = int(self.sequence_lengths.sum(dtype=np.int64)) * self.dtype.itemsize
        if os.path.getsize(bin_path) != total_bytes:
            raise ValueError(
                f"{bin_path}: size {os.path.getsize(bin_path)} bytes, its index describes {total_bytes}"
            )
        # np.memmap refuses empty files; an empty dataset has nothing to read anyway.
        self._data = np.memmap(bin_path, dtype=np.uint8, mode="r") if total_bytes else np.zeros(0, np.uint8)

    def __getstate__(self) -> dict[str, str]:  # DataLoader workers reopen the maps instead of copying them
        return {"path_prefix": self.path_prefix}

    def __setstate__(self, state: dict[str, str]) -> None:
        self.path_prefix = state["path_prefix"]
        self._open()

    def __len__(self) -> int:
        return int(self.sequence_lengths.size)

    @property
    def num_documents(self) -> int:
        return int(self.document_indices.size) - 1

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence `idx` (to its end when length is None)."""
        size = int(self.sequence_lengths[idx])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) are outside sequence {idx} of {size} tokens"
            )
        pointer = int(self.sequence_pointers[idx]) + offset * self.dtype.itemsize
        return np.frombuffer(self._data, dtype=self.dtype, count=length, offset=pointer)

    def __getitem__(self, idx: Union[int, np.integer, slice]) -> Union[np.ndarray, list[np.ndarray]]:
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                raise ValueError("indexed datasets only support contiguous slices")
            if start >= stop:
                return []
            lengths = self.sequence_lengths[start:stop]
            tokens = np.frombuffer(
                self._data,
                dtype=self.dtype,
                count=int(lengths.sum(dtype=np.int64)),
                offset=int(self.sequence_pointers[start]),
            )
            return np.split(tokens, np.cumsum(lengths)[:-1])
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence {idx} out of range for a dataset of {len(self)} sequences")
        return self.get(int(idx))
