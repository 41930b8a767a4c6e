"""Sharded runs (4 shards + merge), reruns and workers give the bytes of one process."""

from __future__ import annotations

import json
import random

import pytest

from tests.corpus_helpers import (
    edit_words,
    lambada_passages,
    prepare,
    prepare_main,
    shared_data,
    wikitext_paragraphs,
    write_jsonl,
)


def _corpus(tmp_path, files: int) -> list:
    rng = random.Random(4)
    texts = wikitext_paragraphs(limit=160)
    vocabulary = sorted({w for t in texts for w in t.split()})
    texts += [edit_words(texts[i], 0.07, vocabulary, rng) for i in range(0, 160, 5)]  # near-duplicates
    texts += [texts[i] for i in range(3, 160, 11)]  # exact duplicates
    passage = lambada_passages(1)[0]
    texts += [f"{texts[7]} {passage} {texts[8]}", passage]  # contamination
    rng.shuffle(texts)
    size = -(-len(texts) // files)
    return [write_jsonl(tmp_path / f"in{k}.jsonl", texts[k * size : (k + 1) * size]) for k in range(files)]


@pytest.mark.parametrize("files", [2, 5])  # 2 files: lines are dealt to shards; 5 files: whole files are
def test_four_shards_and_merge_equal_one_process(tmp_path, files, capsys):
    inputs = [str(p) for p in _corpus(tmp_path, files)]
    eval_file = str(shared_data() / "lambada" / "lambada_test.jsonl")
    flags = ["--no-language-filter", "--no-quality-filter", "--decontaminate", eval_file]
    _, single = prepare(tmp_path, inputs, *flags, name="single")
    shards = str(tmp_path / "shards")
    common = ["--input", *inputs, *flags, "--num-shards", "4", "--shard-dir", shards]
    for index in (2, 0, 3, 1):
        prepare_main([*common, "--shard-index", str(index)])
    prepare_main([*common, "--shard-index", "1"])  # a rerun of a finished shard is skipped
    assert "shard 1 of 4: already done, skipped" in capsys.readouterr().out
    output, report = tmp_path / "merged.jsonl", tmp_path / "merged.json"
    prepare_main([*common, "--merge", "--output", str(output), "--report", str(report)])

    assert output.read_bytes() == (tmp_path / "single.jsonl").read_bytes()
    merged = json.loads(report.read_text())
    for key in ("stages", "dropped", "duplicates", "decontamination"):
        assert merged[key] == single[key], key
    assert single["duplicates"]["exact"]["removed_docs"] > 0
    assert single["duplicates"]["fuzzy"]["removed_docs"] > 0
    assert single["decontamination"]["docs"] == 2


def test_workers_give_the_same_output(tmp_path):
    inputs = _corpus(tmp_path, 1)
    prepare(tmp_path, inputs, "--no-quality-filter", name="one")
    prepare(tmp_path, inputs, "--no-quality-filter", "--workers", "2", name="two")
    assert (tmp_path / "one.jsonl").read_bytes() == (tmp_path / "two.jsonl").read_bytes()


def test_merge_before_every_shard_finished_is_an_error(tmp_path, capsys):
    inputs = [str(p) for p in _corpus(tmp_path, 1)]
    common = [
        "--input",
        *inputs,
        "--num-shards",
        "2",
        "--shard-dir",
        str(tmp_path / "s"),
        "--no-language-filter",
    ]
    prepare_main([*common, "--shard-index", "0"])
    output = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit, match=r"shards \[1\] of 2 have not finished"):
        prepare_main([*common, "--merge", "--output", str(output), "--report", str(tmp_path / "r.json")])
    assert not output.exists()
    with pytest.raises(SystemExit, match="made with other settings"):
        prepare_main([*common, "--shard-index", "0", "--minhash-threshold", "0.6"])
