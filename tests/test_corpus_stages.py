"""The per-document stages: cleaning (ftfy, Gutenberg boilerplate), language, quality; bad input."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from megatron.corpus.clean import Cleaner, strip_gutenberg
from megatron.corpus.language import LanguageFilter
from megatron.corpus.quality import QualityThresholds, quality_failure
from tests.corpus_data import CHATTERBOT_LANGUAGES, chatterbot_folder, multilingual_documents
from tests.corpus_helpers import FIXTURES, lambada_passages, prepare, wikitext_paragraphs, write_jsonl

PLAY = FIXTURES / "gutenberg_hamlet_excerpt.txt"


def test_gutenberg_header_and_licence_are_removed_from_a_real_play(tmp_path):
    text = PLAY.read_text(encoding="utf-8")
    body, removed = strip_gutenberg(text)
    assert body.startswith("HAMLET, PRINCE OF DENMARK")
    assert "Gutenberg" not in body and "license" not in body.lower()
    assert "Who's there?" in body and "Nay, answer me: stand, and unfold yourself." in body
    assert removed == len(text) - len(body)
    out, report = prepare(tmp_path, [write_jsonl(tmp_path / "in.jsonl", [text])], "--no-dedup")
    assert [r["text"] for r in out] == [body]
    assert report["boilerplate"] == {"docs": 1, "chars": removed}


def test_text_to_jsonl_then_prepare_corpus_like_the_quickstart(tmp_path):
    corpus = tmp_path / "play.jsonl"
    subprocess.run(
        [sys.executable, "tools/text_to_jsonl.py", "--input", str(PLAY), "--output", str(corpus),
         "--paragraphs-per-doc", "10000"], check=True, capture_output=True,
    )  # fmt: skip
    out, _ = prepare(tmp_path, [corpus], "--no-dedup")
    assert len(out) == 1 and "PROJECT GUTENBERG" not in out[0]["text"].upper()


@pytest.mark.parametrize(
    "start",
    ["*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***", "***START OF THE PROJECT GUTENBERG EBOOK X***"],
)
def test_gutenberg_marker_spellings(start):
    body, _ = strip_gutenberg(
        f"header\n{start}\nplay text\nEnd of the Project Gutenberg EBook of Hamlet\nlicence"
    )
    assert body == "play text"


def test_text_without_markers_is_left_alone():
    text = "This article mentions Project Gutenberg in passing.\n"
    assert strip_gutenberg(text) == (text, 0)


def test_ftfy_repairs_mojibake_and_entities():
    assert (
        Cleaner()("The cafÃ© serves crÃ¨me brÃ»lÃ©e &amp; tea").text == "The café serves crème brûlée & tea"
    )


def test_language_filter_on_a_planted_multilingual_set():
    folder = chatterbot_folder()
    if folder is None:
        pytest.skip("chatterbot-corpus (PyPI) is not installed: pip install chatterbot-corpus==1.3.3 pyyaml")
    docs = multilingual_documents(folder) + [("en", p) for p in wikitext_paragraphs(limit=200)]
    assert len({code for code, _ in docs}) >= 15 and sum(code != "en" for code, _ in docs) >= 1000
    keep = LanguageFilter(["en"], 0.3)  # the default of --language-threshold
    decisions = [(code == "en", keep.keep(text)[0]) for code, text in docs]
    accuracy = sum(a == b for a, b in decisions) / len(decisions)
    english_kept = sum(b for a, b in decisions if a) / sum(a for a, _ in decisions)
    others_dropped = sum(not b for a, b in decisions if not a) / sum(not a for a, _ in decisions)
    print(f"accuracy {accuracy:.4f}, English kept {english_kept:.4f}, others dropped {others_dropped:.4f}")
    assert accuracy >= 0.95 and english_kept >= 0.95 and others_dropped >= 0.95
    assert set(CHATTERBOT_LANGUAGES.values()) > {"de", "fr", "ru", "zh"}


def test_quality_rules_on_real_and_broken_text():
    t = QualityThresholds()
    good = "\n".join(lambada_passages(3))
    assert quality_failure(good, t) is None
    assert quality_failure("the cat and the dog", t) == "word_count"
    assert quality_failure(" ".join(["#tag"] * 60) + " " + good, t) == "symbol_word_ratio"
    trailing = "\n".join(
        f"line {i} of the story, and so it goes on and on for a while longer..." for i in range(40)
    )
    assert quality_failure(trailing, t) == "ellipsis_lines"
    lines = good.split(". ")
    assert quality_failure("\n".join(lines + lines), t) == "duplicate_lines"
    assert quality_failure(" ".join(["1234 5678 9012 3456 the of"] * 30), t) == "alpha_words"
    assert (
        quality_failure("\n".join(f"- item {i} with the and of things" for i in range(60)), t)
        == "bullet_lines"
    )
    no_stop = " ".join(
        w for w in good.split() if w.lower() not in {"the", "be", "to", "of", "and", "that", "have", "with"}
    )
    assert quality_failure(no_stop, t) == "stop_words"


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"text": "fine"}\n{"text": "broken\n', r"in\.jsonl:2: malformed JSON"),
        (b'{"text": "fine"}\n\n{"body": "no text"}\n', r"in\.jsonl:3: JSON key 'text' not found"),
        (b'{"text": 5}\n', r"in\.jsonl:1: JSON key 'text' must hold a string"),
        (b'["a list"]\n', r"in\.jsonl:1: expected a JSON object"),
        (b'{"text": "caf\xe9"}\n', r"in\.jsonl:1: not valid UTF-8"),
    ],
)
def test_bad_lines_are_errors_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "in.jsonl"
    path.write_bytes(content)
    with pytest.raises(SystemExit, match=message):
        prepare(tmp_path, [path], "--no-language-filter")
    assert not (tmp_path / "out.jsonl").exists() and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_inputs_and_unreadable_compression(tmp_path, suffix):
    import zstandard

    docs = wikitext_paragraphs(limit=20)
    plain = write_jsonl(tmp_path / "in.jsonl", docs).read_bytes()
    packed = gzip.compress(plain) if suffix == ".gz" else zstandard.ZstdCompressor().compress(plain)
    (tmp_path / f"in.jsonl{suffix}").write_bytes(packed)
    out, _ = prepare(tmp_path, [tmp_path / f"in.jsonl{suffix}"], "--no-quality-filter")
    assert [r["text"] for r in out] == [r["text"] for r in map(json.loads, plain.splitlines())]
    broken = tmp_path / f"broken.jsonl{suffix}"
    broken.write_bytes(packed[: len(packed) // 2] + b"\x00garbage" * 4)
    with pytest.raises(SystemExit, match=rf"broken\.jsonl{suffix}:\d+: cannot read"):
        prepare(tmp_path, [broken], "--no-quality-filter", name="broken")
    assert not (tmp_path / "broken.jsonl").exists()


def test_missing_input_and_missing_output_folder_are_flag_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare(tmp_path, [tmp_path / "absent.jsonl"])
    assert "--input: no such file" in capsys.readouterr().err
    corpus = write_jsonl(tmp_path / "in.jsonl", ["text"])
    from tools.prepare_corpus import main

    with pytest.raises(SystemExit):
        main(
            [
                "--input",
                str(corpus),
                "--output",
                str(tmp_path / "no/out.jsonl"),
                "--report",
                str(tmp_path / "r.json"),
            ]
        )
    assert "--output: directory" in capsys.readouterr().err


def test_a_missing_library_names_the_package_to_install(tmp_path, monkeypatch):
    import importlib

    real = importlib.import_module
    monkeypatch.setattr(
        importlib, "import_module", lambda name: real("no_such_module_x") if name == "ftfy" else real(name)
    )
    corpus = write_jsonl(tmp_path / "in.jsonl", ["text"])
    with pytest.raises(SystemExit, match=r"need the 'ftfy' package: pip install -e '\.\[corpus\]'"):
        prepare(tmp_path, [corpus], "--workers", "2")
    assert not (tmp_path / "out.jsonl").exists()


def test_an_error_in_a_worker_ends_the_run_cleanly(tmp_path):
    texts = wikitext_paragraphs(limit=300)
    path = write_jsonl(tmp_path / "in.jsonl", texts)
    with open(path, "a") as file:
        file.write('{"text": "unterminated\n')
    with pytest.raises(SystemExit, match=rf"in\.jsonl:{len(texts) + 1}: malformed JSON"):
        prepare(tmp_path, [path], "--no-quality-filter", "--workers", "2")
    assert not (tmp_path / "out.jsonl").exists() and not list(tmp_path.glob(".*"))
    with pytest.raises(SystemExit):
        prepare(tmp_path, [path], "--no-quality-filter", name="in")  # --output would overwrite the input
