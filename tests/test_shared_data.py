"""Without the shared evaluation data, every test module still collects: the tests that need the data skip
with the reason and the others run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USERS = [
    "test_tasks_zeroshot.py",
    "test_generation_tools.py",
    "test_training.py",
    "test_checkpoint_tools_hf.py",
]


def test_missing_shared_data_skips_only_the_tests_that_need_it(tmp_path: Path) -> None:
    env = {**os.environ, "MEGATRON_SHARED_DATA": str(tmp_path / "nowhere"), "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         *(f"tests/{name}" for name in USERS),
         "-k", "test_wikitext_detokenizer_rules or test_gpt_loss_falls_on_real_text"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "error" not in out.lower(), out
    assert "1 skipped" in out and " passed" in out, out
    assert "shared evaluation data not found" in out and "MEGATRON_SHARED_DATA" in out, out
