"""Exact and fuzzy deduplication on real WikiText paragraphs with planted duplicates."""

from __future__ import annotations

import random

from tests.corpus_helpers import edit_words, prepare, wikitext_paragraphs, write_jsonl

ONLY_DEDUP = ("--no-clean", "--no-language-filter", "--no-quality-filter")


def test_planted_near_and_exact_duplicates_are_found(tmp_path):
    rng = random.Random(12)
    originals = wikitext_paragraphs(limit=300)
    vocabulary = sorted({w for p in originals for w in p.split()})
    docs = [(text, None, "") for text in originals]  # (text, index of the original it copies, kind)
    for source in rng.sample(range(len(originals)), 100):
        docs.append((edit_words(originals[source], rng.uniform(0.05, 0.10), vocabulary, rng), source, "near"))
    for source in rng.sample(range(len(originals)), 40):  # exact copies, up to case and spacing
        docs.append(("  " + originals[source].upper().replace(" ", "   ") + " ", source, "exact"))
    order = list(range(len(originals), len(docs)))
    rng.shuffle(order)
    docs = docs[: len(originals)] + [docs[i] for i in order]  # copies come after their originals

    out, report = prepare(
        tmp_path, [write_jsonl(tmp_path / "in.jsonl", [t for t, _, _ in docs])], *ONLY_DEDUP
    )

    kept = {record["id"] for record in out}
    planted = [i for i, (_, source, _) in enumerate(docs) if source is not None]
    removed = set(range(len(docs))) - kept
    exact = [i for i in planted if docs[i][2] == "exact"]
    assert all(i not in kept for i in exact), "every exact copy is removed"
    assert all(docs[i][1] in kept for i in planted), "the original of each cluster is the one kept"
    recall = sum(i in removed for i in planted) / len(planted)
    precision = sum(docs[i][1] is not None for i in removed) / max(len(removed), 1)
    print(f"near-duplicate recall {recall:.3f}, precision {precision:.3f}")
    assert recall >= 0.95, f"recall {recall:.3f}"
    assert precision >= 0.95, f"precision {precision:.3f}"
    assert report["duplicates"]["exact"]["removed_docs"] == len(exact)
    assert report["stages"]["fuzzy_dedup"]["docs_out"] == len(out)
    example = report["duplicates"]["fuzzy"]["examples"][0]
    assert example["kept"]["preview"] and example["removed"][0]["source"].endswith(tuple("0123456789"))


def test_unrelated_documents_are_all_kept(tmp_path):
    originals = wikitext_paragraphs(limit=300)
    out, report = prepare(tmp_path, [write_jsonl(tmp_path / "in.jsonl", originals)], *ONLY_DEDUP)
    assert [r["text"] for r in out] == originals
    assert report["duplicates"]["fuzzy"]["clusters"] == 0
