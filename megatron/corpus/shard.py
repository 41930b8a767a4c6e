"""The shard stage: one shard's documents through the per-document stages, in a pool of workers.

Shard i of N takes the input files with index % N == i when there are at least N files, else the
non-blank lines with (running line count over all files) % N == i. It writes into the shard folder:
  shard-i-of-N.jsonl   kept documents, in input order
  shard-i-of-N.meta    per document: ordinal (int64), exact key (uint64), text bytes (int64)
  shard-i-of-N.sig     per document: the MinHash signature (num_perm uint32)
  shard-i-of-N.json    counts per stage and examples for the report
  shard-i-of-N.done    the marker, written last: a rerun skips the shard
Documents are read, processed and written in bounded batches, so memory does not grow with the input.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from megatron.corpus.decontaminate import NgramIndex
from megatron.corpus.documents import (
    STAGES,
    CorpusConfig,
    DocumentProcessor,
    DocumentResult,
    process_or_error,
    split_ordinal,
)
from megatron.corpus.io import CorpusError, atomic_output, numbered_lines

META_DTYPE = np.dtype([("ordinal", "<i8"), ("exact", "<u8"), ("bytes", "<i8")])
BATCH_PER_WORKER = 256
EXAMPLES = 20


def shard_path(folder: str, index: int, count: int, suffix: str) -> str:
    return os.path.join(folder, f"shard-{index:05d}-of-{count:05d}.{suffix}")


@dataclass
class ShardStats:
    """Per-stage document and byte counts, drop reasons and decontamination examples of one shard."""

    stages: dict[str, list[int]] = field(default_factory=lambda: {s: [0, 0, 0, 0] for s in STAGES})
    dropped: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in STAGES})
    boilerplate_docs: int = 0
    boilerplate_chars: int = 0
    decontaminated: list[dict] = field(default_factory=list)
    decontaminated_docs: int = 0
    decontaminated_chars: int = 0

    def add(self, result: DocumentResult, source: str, order: tuple[int, int]) -> None:
        for stage, bytes_in, bytes_out in result.passed:
            counts = self.stages[stage]
            counts[0] += 1
            counts[1] += bytes_in
            out_docs = len(result.pieces) if stage == "decontaminate" else 1
            counts[2] += out_docs
            counts[3] += bytes_out
        if result.dropped is not None:
            self.stages[result.dropped][0] += 1
            self.stages[result.dropped][1] += result.dropped_bytes
            self.dropped[result.dropped][result.reason] += 1
        if result.boilerplate_chars:
            self.boilerplate_docs += 1
            self.boilerplate_chars += result.boilerplate_chars
        if result.matched:
            self.decontaminated_docs += 1
            self.decontaminated_chars += result.removed_chars
            if len(self.decontaminated) < EXAMPLES:
                action = (
                    "dropped"
                    if result.dropped == "decontaminate"
                    else f"cut into {len(result.pieces)} pieces"
                )
                self.decontaminated.append(
                    {"order": list(order), "source": source, "action": action, "removed_chars": result.removed_chars,
                     "matched": [m[:300] for m in result.matched[:3]]}
                )  # fmt: skip

    def to_json(self) -> dict:
        data = {k: v for k, v in vars(self).items() if k != "dropped"}
        data["dropped"] = {s: dict(c) for s, c in self.dropped.items()}
        return data


def shard_items(config: CorpusConfig, index: int, count: int) -> Iterator[tuple[str, int, int, bytes]]:
    """(where, file index, line number, raw line) of the documents of shard `index` of `count`."""
    by_file = len(config.inputs) >= count
    running = 0
    for file_index, path in enumerate(config.inputs):
        if by_file and file_index % count != index:
            continue
        for line_number, raw in numbered_lines(path):
            mine = by_file or running % count == index
            running += 1
            if mine:
                yield f"{path}:{line_number}", file_index, line_number, raw


_processor: Optional[DocumentProcessor] = None


def _init_worker(config: CorpusConfig, ngrams: Optional[NgramIndex]) -> None:
    global _processor
    _processor = DocumentProcessor(config, ngrams)


def _process(item: tuple[str, int, int, bytes]) -> DocumentResult | str:
    if _processor is None:
        raise RuntimeError("_process ran in a process that _init_worker did not set up")
    return process_or_error(_processor, item)


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _results(config: CorpusConfig, ngrams: Optional[NgramIndex], items: Iterator, workers: int) -> Iterator:
    """(item, result) in input order, from `workers` processes (or this one when workers == 1)."""
    if workers == 1:
        _init_worker(config, ngrams)
        for item in items:
            yield item, _process(item)
        return
    with multiprocessing.Pool(workers, _init_worker, (config, ngrams)) as pool:
        for batch in _batches(items, BATCH_PER_WORKER * workers):
            yield from zip(batch, pool.imap(_process, batch, chunksize=16))


def is_done(folder: str, index: int, count: int, config: CorpusConfig) -> bool:
    """True when shard `index` finished with this config; CorpusError when it finished with another."""
    marker = shard_path(folder, index, count, "done")
    if not os.path.exists(marker):
        return False
    with open(marker) as file:
        fingerprint = file.read().strip()
    if fingerprint != config.fingerprint():
        raise CorpusError(
            f"{marker}: this shard was made with other settings (fingerprint {fingerprint}, now "
            f"{config.fingerprint()}); delete {folder} or use another --shard-dir"
        )
    return True


def run_shard(
    config: CorpusConfig, ngrams: Optional[NgramIndex], folder: str, index: int, count: int, workers: int
) -> bool:
    """Process shard `index` of `count` into `folder`; False if it was already done (skipped)."""
    if is_done(folder, index, count, config):
        return False
    os.makedirs(folder, exist_ok=True)
    stats = ShardStats()
    with ExitStack() as stack:
        out = stack.enter_context(atomic_output(shard_path(folder, index, count, "jsonl")))
        meta = stack.enter_context(atomic_output(shard_path(folder, index, count, "meta")))
        sig = stack.enter_context(atomic_output(shard_path(folder, index, count, "sig")))
        for item, result in _results(config, ngrams, shard_items(config, index, count), workers):
            if isinstance(result, str):
                raise CorpusError(result)
            stats.add(result, item[0], (item[1], item[2]))
            for piece in result.pieces:
                out.write(piece.line)
                meta.write(np.array([(piece.ordinal, piece.exact, piece.text_bytes)], META_DTYPE).tobytes())
                if piece.signature is not None:
                    sig.write(piece.signature)
        report = stack.enter_context(atomic_output(shard_path(folder, index, count, "json"), "w"))
        json.dump({"fingerprint": config.fingerprint(), **stats.to_json()}, report)
    with atomic_output(shard_path(folder, index, count, "done"), "w") as marker:
        marker.write(config.fingerprint() + "\n")
    return True


def describe(config: CorpusConfig, ordinal: int) -> str:
    """'file:line' (with the piece number of a cut document) of an ordinal."""
    file_index, line, piece = split_ordinal(ordinal)
    return f"{config.inputs[file_index]}:{line}" + (f" (piece {piece})" if piece else "")
