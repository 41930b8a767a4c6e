"""The real evaluation data beside the checkout (../shared/data: WikiText-2, LAMBADA), and a small GPT
dataset built from it the way a user would: train a byte-level BPE, preprocess to .bin/.idx."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _shared_data() -> Path:
    candidates = [
        os.environ.get("MEGATRON_SHARED_DATA"),
        ROOT.parent / "shared" / "data",
        "/work/shared/data",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "wikitext-2").is_dir():
            return Path(candidate)
    raise FileNotFoundError(
        "shared evaluation data not found: set MEGATRON_SHARED_DATA to the shared/data folder"
    )


SHARED_DATA = _shared_data()
WIKITEXT_VALID = SHARED_DATA / "wikitext-2" / "valid.txt"


def wikitext_articles(path: Path = WIKITEXT_VALID) -> list[str]:
    """The articles of a WikiText file, split at its top-level ` = Title = ` headings."""
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
