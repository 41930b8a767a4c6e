"""The real evaluation data beside the checkout (../shared/data: WikiText-2, LAMBADA), and a small GPT
dataset built from it the way a user would: train a byte-level BPE, preprocess to .bin/.idx.

MEGATRON_SHARED_DATA, when set, names the folder (and nothing else is tried); otherwise ../shared/data
beside the checkout, then /work/shared/data. When none holds the data, importing this module still
works: `shared_path(...)` skips the calling test with the reason, so only the tests that need the data
are skipped and the rest of the module runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _find_shared_data() -> tuple[Optional[Path], str]:
    """(the data folder, "") or (None, why it was not found)."""
    override = os.environ.get("MEGATRON_SHARED_DATA")
    candidates = (
        [Path(override)] if override else [ROOT.parent / "shared" / "data", Path("/work/shared/data")]
    )
    for candidate in candidates:
        if (candidate / "wikitext-2").is_dir():
            return candidate, ""
    tried = ", ".join(str(c) for c in candidates)
    return (
        None,
        f"shared evaluation data not found (tried {tried}): set MEGATRON_SHARED_DATA to the shared/data folder",
    )


SHARED_DATA, MISSING_REASON = _find_shared_data()


def shared_path(*parts: str) -> Path:
    """SHARED_DATA / parts; skips the calling test (with the reason) when the shared data is missing."""
    if SHARED_DATA is None:
        pytest.skip(MISSING_REASON)
    return SHARED_DATA.joinpath(*parts)


def wikitext_articles(path: Optional[Path] = None) -> list[str]:
    """The articles of a WikiText file (WikiText-2 valid by default), split at its ` = Title = ` headings."""
    path = path if path is not None else shared_path("wikitext-2", "valid.txt")
    docs, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(" = ") and not line.startswith(" = = ") and current:
            docs.append("\n".join(current))
            current = []
        current.append(line)
    docs.append("\n".join(current))
    return docs


def wikitext_gpt_dataset(out_dir: Path, num_docs: int, vocab_size: int) -> tuple[str, list[str]]:
    """The first `num_docs` WikiText-2 validation articles, tokenized with a byte-level BPE of `vocab_size`
    tokens trained on them. Returns the dataset prefix and the tokenizer flags that read it."""
    from tools import preprocess_data, train_tokenizer

    jsonl = out_dir / "wiki.jsonl"
    docs = wikitext_articles()[:num_docs]
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    train_tokenizer.main(
        ["--input", str(jsonl), "--tokenizer-type", "GPT2BPETokenizer", "--vocab-size", str(vocab_size),
         "--output-dir", str(out_dir)]
    )  # fmt: skip
    tok = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(out_dir / "vocab.json"),
           "--merge-file", str(out_dir / "merges.txt")]  # fmt: skip
    preprocess_data.main(
        ["--input", str(jsonl), "--output-prefix", str(out_dir / "wiki"), "--append-eod", *tok]
    )
    return str(out_dir / "wiki_text_document"), tok
