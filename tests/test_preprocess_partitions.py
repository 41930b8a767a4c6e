"""tools/preprocess_data.py with many inputs and --partitions: the same bytes as one file in one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_preprocess import GPT2_FLAGS, corpus_texts, run_preprocess, write_jsonl
from tools import merge_datasets


def _files(tmp_path: Path, count: int) -> list[str]:
    texts = corpus_texts(90)
    size = -(-len(texts) // count)
    return [
        str(
            write_jsonl(
                tmp_path / f"in{k:02d}.jsonl", [{"text": t} for t in texts[k * size : (k + 1) * size]]
            )
        )
        for k in range(count)
    ]


def _bytes(prefix: Path) -> list[bytes]:
    return [Path(f"{prefix}_text_document{ext}").read_bytes() for ext in (".bin", ".idx")]


@pytest.mark.parametrize("files, partitions", [(1, 3), (5, 3)])  # runs of lines; blocks of whole files
def test_partitions_and_many_inputs_equal_one_run(tmp_path, files, partitions):
    single = tmp_path / "single.jsonl"
    single.write_bytes(b"".join(Path(p).read_bytes() for p in _files(tmp_path, 5)))
    run_preprocess(
        "--input", str(single), "--output-prefix", str(tmp_path / "one"), *GPT2_FLAGS, "--append-eod"
    )
    inputs = [str(single)] if files == 1 else sorted(str(p) for p in tmp_path.glob("in*.jsonl"))
    run_preprocess(
        "--input", *inputs, "--output-prefix", str(tmp_path / "parts"), *GPT2_FLAGS, "--append-eod",
        "--partitions", str(partitions), "--workers", str(partitions),
    )  # fmt: skip
    assert _bytes(tmp_path / "parts") == _bytes(tmp_path / "one")
    assert not list(tmp_path.glob(".partitions.*")), "the partition folder is removed"


def test_partition_index_then_merge_datasets_like_the_slurm_array(tmp_path):
    inputs = _files(tmp_path, 2)
    run_preprocess("--input", *inputs, "--output-prefix", str(tmp_path / "one"), *GPT2_FLAGS)
    (tmp_path / "parts").mkdir()
    for index in (2, 0, 1):  # array tasks finish in any order
        run_preprocess(
            "--input", str(tmp_path / "in*.jsonl"), "--output-prefix", str(tmp_path / "parts" / "corpus"),
            *GPT2_FLAGS, "--partitions", "3", "--partition-index", str(index),
        )  # fmt: skip
    assert (tmp_path / "parts" / "corpus-00001-of-00003_text_document.idx").exists()
    merge_datasets.main(
        ["--input", str(tmp_path / "parts"), "--output-prefix", str(tmp_path / "merged_text_document")]
    )
    assert [Path(f"{tmp_path}/merged_text_document{e}").read_bytes() for e in (".bin", ".idx")] == _bytes(
        tmp_path / "one"
    )


def test_bad_partition_flags(tmp_path, capsys):
    inputs = _files(tmp_path, 1)
    for flags, message in [
        (["--partitions", "0"], "--partitions must be >= 1"),
        (["--partitions", "2", "--partition-index", "2"], "--partition-index must be in [0, 2)"),
        (["--input", str(tmp_path / "none*.jsonl")], "no such file"),
    ]:
        with pytest.raises(SystemExit):
            run_preprocess("--input", *inputs, "--output-prefix", str(tmp_path / "x"), *GPT2_FLAGS, *flags)
        assert message in capsys.readouterr().err
