"""tools/train_tokenizer.py: each trained tokenizer loads with its Megatron tokenizer type and round-trips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron.tokenizer import BertWordPieceTokenizer, GPT2BPETokenizer, SentencePieceTokenizer
from tools import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be, or not to be: that is the question.",
    "All that glitters is not gold; all who wander are not lost.",
    "Ünïcödé café naïve résumé — and 日本語 too!",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(60):
            lines = [SENTENCES[(i + j) % len(SENTENCES)] for j in range(3)]
            f.write(json.dumps({"text": "\n".join(lines), "id": i}) + "\n")
    return path


def test_byte_level_bpe_loads_as_gpt2(tmp_path, corpus):
    out = tmp_path / "bpe"
    train_tokenizer.main(["--input", str(corpus), "--tokenizer-type", "GPT2BPETokenizer", "--vocab-size", "400", "--output-dir", str(out)])  # fmt: skip
    assert sorted(os.listdir(out)) == ["merges.txt", "vocab.json"]
    tok = GPT2BPETokenizer(str(out / "vocab.json"), str(out / "merges.txt"))
    assert 257 < tok.vocab_size <= 400 and tok.eod == 0
    for text in [*SENTENCES, "unseen wörds 😀 still round-trip\n\n"]:
        assert tok.detokenize(tok.tokenize(text)) == text
    assert len(tok.tokenize(SENTENCES[0])) < len(SENTENCES[0].encode()) / 2  # merges were learned


@pytest.mark.parametrize("kind", ["BertWordPieceLowerCase", "BertWordPieceCase"])
def test_wordpiece_loads_as_bert(tmp_path, corpus, kind):
    out = tmp_path / "wp"
    train_tokenizer.main(["--input", str(corpus), "--tokenizer-type", kind, "--vocab-size", "300", "--output-dir", str(out), "--output-prefix", "wiki"])  # fmt: skip
    assert os.listdir(out) == ["wiki-vocab.txt"]
    lines = (out / "wiki-vocab.txt").read_text(encoding="utf-8").split("\n")
    assert lines[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = BertWordPieceTokenizer(str(out / "wiki-vocab.txt"), lower_case=kind.endswith("LowerCase"))
    ids = tok.tokenize("The quick brown fox.")
    assert tok.vocab["[UNK]"] not in ids
    expected = "the quick brown fox ." if kind.endswith("LowerCase") else "The quick brown fox ."
    assert tok.detokenize(ids) == expected


def test_sentencepiece_model_loads(tmp_path, corpus):
    out = tmp_path / "sp"
    train_tokenizer.main(["--input", str(corpus), "--tokenizer-type", "SentencePieceTokenizer", "--vocab-size", "60", "--output-dir", str(out)])  # fmt: skip
    assert sorted(os.listdir(out)) == ["sentencepiece.model", "sentencepiece.vocab"]
    tok = SentencePieceTokenizer(str(out / "sentencepiece.model"))
    assert tok.vocab_size == 60 + 5  # the model's pieces plus Megatron's <CLS> <SEP> <EOD> <MASK> <PAD>
    for text in SENTENCES[:4]:
        assert tok.detokenize(tok.tokenize(text)) == text


def test_bad_line_fails_cleanly_and_leaves_nothing(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "no text key"}) + "\n")
    for kind in ("GPT2BPETokenizer", "SentencePieceTokenizer"):
        result = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "train_tokenizer.py"), "--input", str(source),
             "--tokenizer-type", kind, "--vocab-size", "300", "--output-dir", str(tmp_path / "out")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert "bad.jsonl:2" in result.stderr and "'text' not found" in result.stderr
        assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]


def test_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_tokenizer.main(["--input", str(tmp_path / "none.jsonl"), "--tokenizer-type", "GPT2BPETokenizer", "--vocab-size", "300", "--output-dir", str(tmp_path)])  # fmt: skip
    assert "none.jsonl" in capsys.readouterr().err
    (tmp_path / "c.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit):
        train_tokenizer.main(["--input", str(tmp_path / "c.jsonl"), "--tokenizer-type", "GPT2BPETokenizer", "--vocab-size", "100", "--output-dir", str(tmp_path)])  # fmt: skip
    assert "at least 257" in capsys.readouterr().err
