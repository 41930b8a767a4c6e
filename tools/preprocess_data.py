"""Tokenize a JSONL corpus into Megatron-LM's `.bin`/`.idx` indexed datasets (Megatron's flags and output).

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my-gpt2 \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt \\
        --append-eod --workers 2

Input: one or more files (`--input a.jsonl b.jsonl.gz 'shards/*.jsonl'`, a quoted pattern is expanded as
Megatron-LM does with glob), read in the order given, one JSON object per line (a `.gz` file is read through
gzip). For each `--json-keys` key (default `text`) the value is a string, or a list of strings taken as
already-split sentences.

`--partitions N` (Megatron-LM's flag) cuts the documents into N contiguous partitions (whole files when
there are at least N files, else equal runs of lines) that are tokenized by N processes with
`--workers / N` workers each, then merged into the one output; the bytes equal a run without partitions.
`--partition-index i` (an addition, for running partitions on separate machines, see
scripts/preprocess_data.sbatch) tokenizes only partition i into `{output_prefix}-{i:05d}-of-{N:05d}_{key}_...`;
`tools/merge_datasets.py` then concatenates the partitions of a folder in order.

Output, per key: `{output_prefix}_{key}_document.bin/.idx`, or `..._sentence.bin/.idx` with
`--split-sentences`. Semantics, per JSON line (= one document) and key, as in Megatron-LM:
1. sentences = Punkt's split of the text with `--split-sentences` (Megatron's `--keep-newlines` variant
   keeps the whitespace after each sentence), else the whole text as one sentence;
2. ids = tokenizer.tokenize(sentence) for each sentence; sentences with no ids are dropped;
3. with `--append-eod`, the end-of-document id is appended to the last sentence;
4. if no sentence remains, the document is skipped for that key (classic Megatron-LM's behaviour; newer
   megatron-core writes an empty document instead); otherwise each sentence becomes one sequence of the
   dataset and the document ends.
The token dtype is uint16 when the tokenizer has fewer than 65500 ids, else int32. Blank lines in the
input are ignored.

Workers tokenize documents in parallel (multiprocessing.Pool.imap, order kept, so any --workers gives the
same bytes); at most a few chunks of documents are in flight, so memory stays bounded for any file size.
Files are written under temporary names and renamed at the end; on any error nothing is left behind.
A malformed line, a missing key or a bad file ends the run with a message naming it (exit status 1).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from typing import IO, TYPE_CHECKING, Optional, Union

import numpy as np

from megatron.data.indexed_dataset import (
    IndexedDatasetBuilder,
    best_fitting_dtype,
    data_file_path,
    index_file_path,
)
from megatron.tokenizer import AbstractTokenizer, TokenizerConfigError, add_tokenizer_args, build_tokenizer

if TYPE_CHECKING:
    from megatron.data.sentence_splitter import SentenceSplitter

CHUNKSIZE = 32  # documents per task sent to a worker (Megatron's value)

# A worker's result for one line: (bytes read, {key: (ids, sentence lengths) or None if empty}) on success,
# (bytes read, error message) on failure.
EncodedDocument = dict[str, Optional[tuple[np.ndarray, list[int]]]]
WorkerResult = tuple[int, Union[EncodedDocument, str]]


def get_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_tokenizer_args(parser)
    group = parser.add_argument_group(title="input data")
    group.add_argument(
        "--input",
        required=True,
        nargs="+",
        help="Input JSONL files or glob patterns (.gz allowed), in order.",
    )
    group.add_argument(
        "--json-keys", nargs="+", default=["text"], help="JSON keys to extract, space separated."
    )
    group.add_argument("--split-sentences", action="store_true", help="Split documents into sentences.")
    group.add_argument(
        "--keep-newlines", action="store_true", help="Keep newlines between sentences when splitting."
    )
    group.add_argument("--lang", default="english", help="Language of the Punkt sentence splitter.")
    group = parser.add_argument_group(title="tokenization process")
    group.add_argument(
        "--append-eod", action="store_true", help="Append an <eod> token to the end of a document."
    )
    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", required=True, help="Path of the output files without the suffix.")
    group = parser.add_argument_group(title="runtime")
    group.add_argument("--workers", type=int, default=1, help="Number of worker processes.")
    group.add_argument("--log-interval", type=int, default=1000, help="Documents between progress lines.")
    group.add_argument("--partitions", type=int, default=1, help="Number of partitions of the input.")
    group.add_argument(
        "--partition-index", type=int, default=None, help="Only tokenize this partition (multi-node runs)."
    )
    args = parser.parse_args(argv)

    args.input = expand_inputs(parser, args.input)
    if args.partitions < 1:
        parser.error(f"--partitions must be >= 1 (got {args.partitions})")
    if args.partition_index is not None and not 0 <= args.partition_index < args.partitions:
        parser.error(f"--partition-index must be in [0, {args.partitions}) (got {args.partition_index})")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1 (got {args.workers})")
    if args.log_interval < 1:
        parser.error(f"--log-interval must be >= 1 (got {args.log_interval})")
    if len(set(args.json_keys)) != len(args.json_keys):
        parser.error(f"--json-keys has a repeated key: {args.json_keys}")
    output_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(output_dir):
        parser.error(f"--output-prefix: directory {output_dir} does not exist")
    if args.keep_newlines and not args.split_sentences:
        print("note: --keep-newlines has no effect without --split-sentences", file=sys.stderr)
    return args


def expand_inputs(parser: argparse.ArgumentParser, patterns: list[str]) -> list[str]:
    """The input files: each argument as is when it names a file, else its sorted glob matches."""
    paths = []
    for pattern in patterns:
        matches = [pattern] if os.path.isfile(pattern) else sorted(glob.glob(pattern))
        if not matches:
            parser.error(f"--input: no such file: {pattern}")
        paths.extend(matches)
    return paths


class DocumentEncoder:
    """Turns one JSONL line into token ids per key (the per-document rule in the module doc)."""

    def __init__(
        self,
        args: argparse.Namespace,
        tokenizer: AbstractTokenizer,
        splitter: Optional[SentenceSplitter],
    ) -> None:
        self.json_keys = list(args.json_keys)
        self.append_eod = args.append_eod
        self.tokenizer = tokenizer
        self.splitter = splitter
        self.dtype = best_fitting_dtype(tokenizer.vocab_size)

    def encode(self, where: str, raw: bytes) -> Union[EncodedDocument, str]:
        """The document on `raw` (at `where`, "file:line") -> EncodedDocument, or an error message."""
        try:
            record = json.loads(raw)
        except UnicodeDecodeError as error:
            return f"{where}: not valid UTF-8 ({error.reason} at byte {error.start})"
        except json.JSONDecodeError as error:
            return f"{where}: malformed JSON: {error.msg} (column {error.colno})"
        if not isinstance(record, dict):
            return f"{where}: expected a JSON object, got {type(record).__name__}"
        encoded: EncodedDocument = {}
        for key in self.json_keys:
            if key not in record:
                return f"{where}: JSON key '{key}' not found (keys on this line: {sorted(record)})"
            value = record[key]
            if isinstance(value, str):
                sentences = self.splitter.split(value) if self.splitter is not None else [value]
            elif isinstance(value, list) and all(isinstance(s, str) for s in value):
                sentences = value
            else:
                return f"{where}: JSON key '{key}' must hold a string or a list of strings"
            try:
                encoded[key] = self._encode_sentences(sentences)
            # ValueError: e.g. a NullTokenizer word that is no id; TypeError: a lone surrogate in the text;
            # OverflowError: an id that does not fit the dataset dtype (a tokenizer with holes in its ids).
            except (ValueError, TypeError, OverflowError) as error:
                return f"{where}: JSON key '{key}': cannot tokenize: {error}"
        return encoded

    def _encode_sentences(self, sentences: list[str]) -> Optional[tuple[np.ndarray, list[int]]]:
        ids: list[int] = []
        lengths: list[int] = []
        for sentence in sentences:
            sentence_ids = self.tokenizer.tokenize(sentence)
            if sentence_ids:
                ids.extend(sentence_ids)
                lengths.append(len(sentence_ids))
        if not lengths:
            return None
        if self.append_eod:
            ids.append(self.tokenizer.eod)
            lengths[-1] += 1
        return np.asarray(ids, dtype=self.dtype), lengths


# Each worker process builds its own tokenizer once (Pool initializer) and keeps it here.
_worker_encoder: Optional[DocumentEncoder] = None


def make_splitter(args: argparse.Namespace) -> Optional[SentenceSplitter]:
    """Punkt for --split-sentences, else None. NLTK is imported only then (it takes a while to load)."""
    if not args.split_sentences:
        return None
    from megatron.data.sentence_splitter import SentenceSplitter

    return SentenceSplitter(args.lang, args.keep_newlines)


def _init_worker(args: argparse.Namespace) -> None:
    global _worker_encoder
    _worker_encoder = DocumentEncoder(args, build_tokenizer(args), make_splitter(args))


def _encode_in_worker(item: tuple[str, bytes, Optional[str]]) -> WorkerResult:
    where, raw, read_error = item
    if read_error is not None:
        return 0, read_error
    if _worker_encoder is None:
        raise RuntimeError("_encode_in_worker ran in a process that _init_worker did not set up")
    return len(raw), _worker_encoder.encode(where, raw)


def open_input(path: str) -> IO[bytes]:
    """The input file as binary lines; `.gz` files are decompressed on the fly."""
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def numbered_lines(path: str, file: IO[bytes]) -> Iterator[tuple[str, bytes, Optional[str]]]:
    """("file:line", line, None) per non-blank line; a read error becomes a final ("file:n", b"", message)."""
    line_number = 0
    try:
        for line_number, line in enumerate(file, start=1):  # noqa: B007 - used after the loop on error
            if line.strip():
                yield f"{path}:{line_number}", line, None
    except (OSError, EOFError) as error:
        where = f"{path}:{line_number + 1}"
        yield where, b"", f"{where}: cannot read the input: {error}"


def input_documents(paths: list[str], first: int = 0, stop: Optional[int] = None) -> Iterator:
    """numbered_lines of every file in turn, only the non-blank lines numbered [first, stop) over all files."""
    count = 0
    for path in paths:
        try:
            file = open_input(path)
        except OSError as error:  # reported by the consumer, like a read error
            yield path, b"", f"--input {path}: {error}"
            return
        with file:
            for item in numbered_lines(path, file):
                if stop is not None and count >= stop:
                    return
                if count >= first or item[2] is not None:
                    yield item
                count += 1


def partition_documents(paths: list[str], partitions: int, index: int) -> Iterator:
    """The documents of partition `index`: a contiguous block of files when there are at least
    `partitions` files, else a contiguous run of lines (the files are counted through once first)."""
    if partitions == 1:
        return input_documents(paths)
    if len(paths) >= partitions:
        return input_documents(
            paths[index * len(paths) // partitions : (index + 1) * len(paths) // partitions]
        )
    total = sum(1 for item in input_documents(paths) if item[2] is None)
    return input_documents(paths, index * total // partitions, (index + 1) * total // partitions)


class BoundedFeed:
    """Iterate over `items` at most `capacity` items ahead of the consumer.

    Pool.imap's feeder thread otherwise reads its whole input at once. The consumer calls `consumed()` per
    result; `stop()` ends the iteration early (so the pool can shut down after an error).
    """

    def __init__(self, items: Iterable, capacity: int) -> None:
        self._items = items
        self._slots = threading.Semaphore(capacity)
        self._stopped = False

    def __iter__(self) -> Iterator:
        for item in self._items:
            self._slots.acquire()
            if self._stopped:
                return
            yield item

    def consumed(self) -> None:
        self._slots.release()

    def stop(self) -> None:
        self._stopped = True
        self._slots.release()


def output_prefixes(args: argparse.Namespace, output_prefix: Optional[str] = None) -> dict[str, str]:
    """{json key: dataset prefix}: `{output_prefix}_{key}_{document|sentence}`."""
    level = "sentence" if args.split_sentences else "document"
    return {key: f"{output_prefix or args.output_prefix}_{key}_{level}" for key in args.json_keys}


def check_setup(args: argparse.Namespace) -> AbstractTokenizer:
    """Build the tokenizer (and splitter) once in the main process, so that setup errors stop the run early."""
    try:
        tokenizer = build_tokenizer(args)
    except TokenizerConfigError as error:
        raise SystemExit(f"error: {error}") from None
    if args.split_sentences:
        from megatron.data.sentence_splitter import PunktNotFoundError

        try:
            make_splitter(args)
        except PunktNotFoundError as error:
            raise SystemExit(f"error: {error}") from None
    if args.append_eod:
        try:
            eod = tokenizer.eod
        except NotImplementedError:
            eod = None
        if eod is None:
            raise SystemExit(f"error: --append-eod: {tokenizer.name} has no end-of-document token")
    return tokenizer


class ProgressLog:
    """Prints "Processed N documents (d docs/s, m MB/s)." to stderr every `interval` documents."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        self.start = time.time()
        self.documents = 0
        self.bytes = 0

    def update(self, n_bytes: int) -> None:
        self.documents += 1
        self.bytes += n_bytes
        if self.documents % self.interval == 0:
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = max(time.time() - self.start, 1e-9)
        return (
            f"Processed {self.documents} documents ({self.documents / elapsed:.1f} docs/s, "
            f"{self.bytes / elapsed / 1024 / 1024:.2f} MB/s)."
        )


def tokenize(args: argparse.Namespace, documents: Iterable, prefixes: dict[str, str], workers: int) -> None:
    """Tokenize `documents` (input_documents items) into the datasets `prefixes` with `workers` processes."""
    dtype = best_fitting_dtype(build_tokenizer(args).vocab_size)
    progress = ProgressLog(args.log_interval)
    skipped = dict.fromkeys(prefixes, 0)
    with ExitStack() as stack:
        builders = {
            key: stack.enter_context(IndexedDatasetBuilder(data_file_path(prefix), dtype=dtype))
            for key, prefix in prefixes.items()
        }
        feed = BoundedFeed(documents, capacity=4 * CHUNKSIZE * workers)
        pool = stack.enter_context(multiprocessing.Pool(workers, initializer=_init_worker, initargs=(args,)))
        stack.callback(feed.stop)  # runs before the pool is terminated, so its feeder thread can finish
        for n_bytes, document in pool.imap(_encode_in_worker, feed, CHUNKSIZE):
            feed.consumed()
            if isinstance(document, str):
                raise SystemExit(f"error: {document}")
            for key, encoded in document.items():
                if encoded is None:
                    skipped[key] += 1
                else:
                    builders[key].add_document(*encoded)
            progress.update(n_bytes)
        for key, prefix in prefixes.items():
            builders[key].finalize(index_file_path(prefix))

    print(progress.line(), file=sys.stderr)
    for key, prefix in prefixes.items():
        note = f" ({skipped[key]} empty documents skipped)" if skipped[key] else ""
        print(f"wrote {data_file_path(prefix)} and {index_file_path(prefix)}{note}")


def partition_prefix(output_prefix: str, index: int, partitions: int) -> str:
    return f"{output_prefix}-{index:05d}-of-{partitions:05d}"


def _run_partition(args: argparse.Namespace, index: int, prefixes: dict[str, str], workers: int) -> None:
    tokenize(args, partition_documents(args.input, args.partitions, index), prefixes, workers)


def tokenize_partitions(args: argparse.Namespace, prefixes: dict[str, str]) -> None:
    """All partitions at once, one process each, into a temporary folder; then merged into `prefixes`."""
    from tools.merge_datasets import merge

    folder = tempfile.mkdtemp(prefix=".partitions.", dir=os.path.dirname(os.path.abspath(args.output_prefix)))
    try:
        parts = []
        for index in range(args.partitions):
            prefix = partition_prefix(os.path.join(folder, "part"), index, args.partitions)
            part = {key: f"{prefix}_{key}" for key in prefixes}
            workers = max(1, args.workers // args.partitions)
            parts.append(
                (multiprocessing.Process(target=_run_partition, args=(args, index, part, workers)), part)
            )
            parts[-1][0].start()
        for process, _ in parts:
            process.join()
        failed = [i for i, (process, _) in enumerate(parts) if process.exitcode != 0]
        if failed:
            raise SystemExit(f"error: partitions {failed} failed (their messages are above)")
        for key, prefix in prefixes.items():
            merge([part[key] for _, part in parts], prefix)
            print(
                f"merged {args.partitions} partitions into {data_file_path(prefix)} and {index_file_path(prefix)}"
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def preprocess(args: argparse.Namespace) -> dict[str, str]:
    """Run the whole conversion; return {json key: output dataset prefix}. Raises SystemExit on bad input."""
    tokenizer = check_setup(args)
    if tokenizer.name.startswith("Bert") and not args.split_sentences:
        print("note: BERT data is usually built with --split-sentences", file=sys.stderr)
    if args.partition_index is not None:
        prefix = partition_prefix(args.output_prefix, args.partition_index, args.partitions)
        prefixes = output_prefixes(args, prefix)
        _run_partition(args, args.partition_index, prefixes, args.workers)
    elif args.partitions > 1:
        prefixes = output_prefixes(args)
        tokenize_partitions(args, prefixes)
    else:
        prefixes = output_prefixes(args)
        tokenize(args, input_documents(args.input), prefixes, args.workers)
    return prefixes


def main(argv: Optional[list[str]] = None) -> None:
    args = get_args(argv)
    try:
        preprocess(args)
    except OSError as error:  # e.g. an unwritable output folder; the message names the path
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
