"""Decontamination against real LAMBADA and WikiText test data (Megatron's 13-grams, 200-character margins)."""

from __future__ import annotations

import pytest

from tests.corpus_helpers import (
    lambada_passages,
    prepare,
    shared_data,
    wikitext_paragraphs,
    words,
    write_jsonl,
)

FLAGS = ("--no-language-filter", "--no-quality-filter", "--no-dedup")


def _ngrams(text: str, n: int = 13) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def _planted(tmp_path):
    passages = lambada_passages(30)[10:30]
    context = wikitext_paragraphs(limit=80)
    unrelated = context[40:80]
    docs = passages[:10]  # verbatim
    docs += [
        f"{context[2 * i]}\n\n{p}\n\n{context[2 * i + 1]}" for i, p in enumerate(passages[10:])
    ]  # inside
    return passages, context, unrelated, write_jsonl(tmp_path / "in.jsonl", docs + unrelated)


def test_planted_lambada_passages_are_cut_and_unrelated_text_untouched(tmp_path):
    passages, context, unrelated, corpus = _planted(tmp_path)
    eval_file = shared_data() / "lambada" / "lambada_test.jsonl"
    out, report = prepare(tmp_path, [corpus], *FLAGS, "--decontaminate", str(eval_file))

    contaminated = set().union(*(_ngrams(p) for p in passages))
    assert all(not (_ngrams(r["text"]) & contaminated) for r in out), "a LAMBADA 13-gram survived"
    assert [r["text"] for r in out if r["id"] >= 20] == unrelated, "unrelated documents are untouched"
    ids = [r["id"] for r in out]
    assert not set(ids) & set(range(10)), "verbatim passages (shorter than the margins) are dropped"
    for i in range(10, 20):  # the WikiText context beyond the 200-character margins survives as pieces
        before, after = context[2 * (i - 10)], context[2 * (i - 10) + 1]
        pieces = [r["text"] for r in out if r["id"] == i]
        if len(before) >= 400:
            assert any(before[:100] in p for p in pieces)
        if len(after) >= 400:
            assert any(after[-100:] in p for p in pieces)
        assert all(len(p) >= 200 for p in pieces)
    assert len({i for i in ids if 10 <= i < 20}) >= 5, "documents with a passage inside are cut, not dropped"
    assert report["decontamination"]["docs"] == 20
    assert report["dropped"]["decontaminate"] == {"match": 10 + sum(1 for i in range(10, 20) if i not in ids)}
    example = report["decontamination"]["examples"][0]
    assert example["action"] == "dropped" and example["matched"][0] in passages[0]


def test_drop_mode_drops_whole_documents(tmp_path):
    passages, _, unrelated, corpus = _planted(tmp_path)
    eval_file = shared_data() / "lambada" / "lambada_test.jsonl"
    out, _ = prepare(
        tmp_path, [corpus], *FLAGS, "--decontaminate", str(eval_file), "--decontaminate-mode", "drop"
    )
    assert [r["text"] for r in out] == unrelated


def test_wikitext_test_set_is_an_evaluation_file(tmp_path):
    """A wiki.test.tokens-style file: one paragraph a line; its paragraphs are found inside documents."""
    test_file = shared_data() / "wikitext-2" / "test.txt"
    paragraphs = [
        line.strip() for line in test_file.read_text(encoding="utf-8").splitlines() if len(line.split()) > 60
    ]
    clean = wikitext_paragraphs(limit=5)
    docs = [f"{clean[0]} {paragraphs[3]}", *clean[1:]]
    out, _ = prepare(
        tmp_path, [write_jsonl(tmp_path / "in.jsonl", docs)], *FLAGS, "--decontaminate", str(test_file)
    )
    assert [r["text"] for r in out if r["id"] > 0] == clean[1:]
    assert all(not (_ngrams(r["text"]) & _ngrams(paragraphs[3])) for r in out)


def test_missing_evaluation_file_is_a_clear_error(tmp_path):
    corpus = write_jsonl(tmp_path / "in.jsonl", ["some text"])
    with pytest.raises(SystemExit, match=r"evaluation file .*nope\.jsonl does not exist"):
        prepare(tmp_path, [corpus], "--decontaminate", str(tmp_path / "nope.jsonl"))
    assert not (tmp_path / "out.jsonl").exists()
