"""Decontamination against evaluation sets, after Megatron-LM's tools/openwebtext/filter_ngrams.py.

Words are the lower-cased `\\w+` runs of a text (punctuation and case do not hide a match). An evaluation
document contributes its `ngram_size`-word n-grams (13, GPT-3's choice); one shorter than that but with at
least `min_ngram_size` words contributes itself whole. A training document that contains any of them is
either dropped (`mode="drop"`) or cut (`mode="cut"`): each matching span is removed together with
`margin` characters on each side (Megatron's 200), the remaining pieces shorter than `min_piece_chars`
are discarded, and a document cut into more than `max_pieces` pieces is dropped, as in Megatron-LM.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from megatron.corpus.io import CorpusError

WORD = re.compile(r"\w+")


def _key(words: list[str]) -> int:
    """A stable 64-bit key of a word sequence (the same in every process, unlike hash())."""
    return int.from_bytes(hashlib.blake2b(" ".join(words).encode("utf-8"), digest_size=8).digest(), "little")


def eval_documents(path: str) -> Iterator[str]:
    """The documents of an evaluation file: a JSONL file's "text" values (LAMBADA), else its lines
    (WikiText's wiki.test.tokens: one paragraph a line)."""
    if not os.path.isfile(path):
        raise CorpusError(f"--decontaminate: evaluation file {path} does not exist")
    with open(path, encoding="utf-8", errors="replace") as file:
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            if path.endswith((".jsonl", ".json")):
                try:
                    record = json.loads(line)
                    text = record["text"]
                except (json.JSONDecodeError, TypeError, KeyError):
                    raise CorpusError(
                        f"{path}:{line_number}: expected a JSON object with a 'text' key"
                    ) from None
                yield text
            else:
                yield line


@dataclass
class NgramIndex:
    """Keys of the evaluation n-grams, by n-gram length."""

    keys: dict[int, set[int]] = field(default_factory=dict)

    @classmethod
    def build(cls, paths: list[str], ngram_size: int = 13, min_ngram_size: int = 8) -> NgramIndex:
        index = cls()
        for path in paths:
            for text in eval_documents(path):
                words = WORD.findall(text.lower())
                if len(words) >= ngram_size:
                    grams = index.keys.setdefault(ngram_size, set())
                    grams.update(_key(words[i : i + ngram_size]) for i in range(len(words) - ngram_size + 1))
                elif len(words) >= min_ngram_size:
                    index.keys.setdefault(len(words), set()).add(_key(words))
        return index

    def __len__(self) -> int:
        return sum(len(v) for v in self.keys.values())

    def matches(self, text: str) -> list[tuple[int, int]]:
        """Character spans [start, end) of `text` covered by evaluation n-grams, merged and sorted."""
        found = [(m.start(), m.end()) for m in WORD.finditer(text)]
        lowered = [text[s:e].lower() for s, e in found]
        spans: list[tuple[int, int]] = []
        for n, keys in self.keys.items():
            for i in range(len(lowered) - n + 1):
                if _key(lowered[i : i + n]) in keys:
                    spans.append((found[i][0], found[i + n - 1][1]))
        return merge_spans(spans)


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


@dataclass(frozen=True)
class Decontamination:
    pieces: list[str]  # what remains of the document (empty: dropped)
    matched: list[str]  # the matching spans' text
    removed_chars: int


def decontaminate(
    text: str,
    index: NgramIndex,
    mode: str,
    margin: int = 200,
    min_piece_chars: int = 200,
    max_pieces: int = 10,
) -> Decontamination:
    """Apply the module's rule to one document."""
    spans = index.matches(text)
    if not spans:
        return Decontamination([text], [], 0)
    matched = [text[s:e] for s, e in spans]
    if mode == "drop":
        return Decontamination([], matched, len(text))
    cuts = merge_spans([(max(0, s - margin), min(len(text), e + margin)) for s, e in spans])
    pieces, previous = [], 0
    for start, end in cuts:
        pieces.append(text[previous:start])
        previous = end
    pieces.append(text[previous:])
    kept = (
        [] if len(pieces) > max_pieces else [p.strip() for p in pieces if len(p.strip()) >= min_piece_chars]
    )
    return Decontamination(kept, matched, len(text) - sum(len(p) for p in kept))
