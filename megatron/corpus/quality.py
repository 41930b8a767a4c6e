"""Gopher-style quality heuristics (Rae et al. 2021, "Scaling Language Models", appendix A), named thresholds.

Words are the whitespace-separated tokens of the text, lines its newline-separated lines and paragraphs its
blank-line-separated blocks. A document fails at the first rule it breaks; the rule's name is reported.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "●", "◦", "‣", "⁃", "-", "*", "·")
ELLIPSES = ("...", "…")


@dataclass(frozen=True)
class QualityThresholds:
    """The Gopher paper's values; every field is a `--quality-*` flag of tools/prepare_corpus.py."""

    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_word_ratio: float = 0.1  # ('#' + ellipses) / words
    max_bullet_lines: float = 0.9  # fraction of lines starting with a bullet
    max_ellipsis_lines: float = 0.3  # fraction of lines ending with an ellipsis
    min_alpha_words: float = 0.8  # fraction of words with at least one letter
    min_stop_words: int = 2  # distinct words of STOP_WORDS present
    max_duplicate_lines: float = 0.3  # fraction of lines that repeat an earlier line
    max_duplicate_line_chars: float = 0.2  # characters in such lines / all characters
    max_duplicate_paragraphs: float = 0.3
    max_duplicate_paragraph_chars: float = 0.2
    # most frequent n-gram's characters / all word characters, n = 2, 3, 4
    max_top_ngram_chars: tuple[float, ...] = field(default=(0.20, 0.18, 0.16))
    # characters of words inside a repeated n-gram / all word characters, n = 5 ... 10
    max_duplicate_ngram_chars: tuple[float, ...] = field(default=(0.15, 0.14, 0.13, 0.12, 0.11, 0.10))


def _duplicate_fractions(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, their characters / all characters)."""
    seen: set[str] = set()
    repeats = repeat_chars = 0
    for item in items:
        if item in seen:
            repeats += 1
            repeat_chars += len(item)
        seen.add(item)
    total_chars = sum(len(item) for item in items)
    return repeats / max(len(items), 1), repeat_chars / max(total_chars, 1)


def _top_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    if not counts:
        return 0.0
    gram, count = counts.most_common(1)[0]
    return count * sum(len(w) for w in gram) / total_chars


def _duplicate_ngram_fraction(words: list[str], n: int, total_chars: int) -> float:
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    counts = Counter(grams)
    covered = bytearray(len(words))
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(words, covered) if c) / total_chars


def _repetition_failure(text: str, words: list[str], t: QualityThresholds) -> Optional[str]:
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    line_fraction, line_chars = _duplicate_fractions(lines)
    if line_fraction > t.max_duplicate_lines:
        return "duplicate_lines"
    if line_chars > t.max_duplicate_line_chars:
        return "duplicate_line_chars"
    paragraph_fraction, paragraph_chars = _duplicate_fractions(paragraphs)
    if paragraph_fraction > t.max_duplicate_paragraphs:
        return "duplicate_paragraphs"
    if paragraph_chars > t.max_duplicate_paragraph_chars:
        return "duplicate_paragraph_chars"
    total_chars = max(sum(len(w) for w in words), 1)
    for n, limit in zip((2, 3, 4), t.max_top_ngram_chars):
        if _top_ngram_fraction(words, n, total_chars) > limit:
            return f"top_{n}gram_chars"
    for n, limit in zip(range(5, 11), t.max_duplicate_ngram_chars):
        if _duplicate_ngram_fraction(words, n, total_chars) > limit:
            return f"duplicate_{n}gram_chars"
    return None


def quality_failure(text: str, t: QualityThresholds) -> Optional[str]:
    """The name of the first rule `text` breaks, or None if it passes them all."""
    words = text.split()
    if not t.min_words <= len(words) <= t.max_words:
        return "word_count"
    mean_length = sum(len(w) for w in words) / len(words)
    if not t.min_mean_word_length <= mean_length <= t.max_mean_word_length:
        return "mean_word_length"
    symbols = text.count("#") + sum(text.count(e) for e in ELLIPSES)
    if symbols / len(words) > t.max_symbol_word_ratio:
        return "symbol_word_ratio"
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if sum(line.startswith(BULLETS) for line in lines) / len(lines) > t.max_bullet_lines:
        return "bullet_lines"
    if sum(line.endswith(ELLIPSES) for line in lines) / len(lines) > t.max_ellipsis_lines:
        return "ellipsis_lines"
    if sum(any(c.isalpha() for c in w) for w in words) / len(words) < t.min_alpha_words:
        return "alpha_words"
    if len(STOP_WORDS.intersection(w.lower() for w in words)) < t.min_stop_words:
        return "stop_words"
    return _repetition_failure(text, words, t)
