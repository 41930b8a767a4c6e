"""The SLURM array recipes in scripts/corpus run as shown (array tasks stood in for by SLURM's variables) and
give the output of one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.corpus_helpers import prepare, wikitext_paragraphs, write_jsonl
from tests.test_preprocess import GPT2_FLAGS, run_preprocess

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts" / "corpus"


def _sbatch(script: str, mode: str, env: dict[str, str]) -> None:
    full = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env)
    proc = subprocess.run(
        ["bash", str(SCRIPTS / script), mode], cwd=ROOT, env=full, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_prepare_corpus_array_then_merge(tmp_path):
    texts = wikitext_paragraphs(limit=60)
    inputs = [write_jsonl(tmp_path / f"in{k}.jsonl", texts[k::3] + texts[:5]) for k in range(3)]
    flags = ["--no-language-filter", "--no-quality-filter"]
    prepare(tmp_path, inputs, *flags, name="single")
    env = {
        "INPUTS": str(tmp_path / "in*.jsonl"), "SHARD_DIR": str(tmp_path / "shards"), "EXTRA_ARGS": " ".join(flags),
        "OUTPUT": str(tmp_path / "merged.jsonl"), "REPORT": str(tmp_path / "merged.json"), "SLURM_ARRAY_TASK_COUNT": "2",
    }  # fmt: skip
    for task in ("1", "0"):
        _sbatch("prepare_corpus.sbatch", "shard", {**env, "SLURM_ARRAY_TASK_ID": task})
    _sbatch("prepare_corpus.sbatch", "merge", {**env, "SLURM_ARRAY_TASK_COUNT": "", "NUM_SHARDS": "2"})
    assert (tmp_path / "merged.jsonl").read_bytes() == (tmp_path / "single.jsonl").read_bytes()


def test_preprocess_array_then_merge(tmp_path):
    corpus = write_jsonl(tmp_path / "in.jsonl", wikitext_paragraphs(limit=40))
    run_preprocess(
        "--input", str(corpus), "--output-prefix", str(tmp_path / "one"), *GPT2_FLAGS, "--append-eod"
    )
    env = {
        "INPUTS": str(corpus), "PARTS_DIR": str(tmp_path / "parts"), "TOKENIZER_ARGS": " ".join(GPT2_FLAGS),
        "OUTPUT_PREFIX": str(tmp_path / "merged_text_document"), "SLURM_ARRAY_TASK_COUNT": "3",
    }  # fmt: skip
    for task in ("2", "0", "1"):
        _sbatch("preprocess_data.sbatch", "partition", {**env, "SLURM_ARRAY_TASK_ID": task})
    _sbatch("preprocess_data.sbatch", "merge", env)
    for ext in (".bin", ".idx"):
        merged = (tmp_path / f"merged_text_document{ext}").read_bytes()
        assert merged == (tmp_path / f"one_text_document{ext}").read_bytes()
