"""The Hugging Face converters without their packages: one line naming what to install, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs a converter as `python tools/checkpoint/<script> --help` would, with `blocked` made unimportable
# (None in sys.modules is how Python spells "this module cannot be imported").
RUN_WITHOUT = """
import runpy, sys
for name in sys.argv[2].split(","):
    sys.modules[name] = None
script = sys.argv[1]
sys.argv = [script, "--help"]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize(
    "script, blocked",
    [
        ("export_hf.py", "transformers"),
        ("import_hf_gpt2.py", "safetensors,safetensors.torch"),
        ("import_hf_llama.py", "transformers"),
    ],
)
def test_missing_hf_package_says_what_to_install(script, blocked):
    path = str(ROOT / "tools" / "checkpoint" / script)
    proc = subprocess.run(
        [sys.executable, "-c", RUN_WITHOUT, path, blocked], capture_output=True, text=True, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{blocked.split(',')[0]} is not installed" in lines[0]
    assert "pip install -e '.[hf]'" in lines[0] and script in lines[0]


def test_hf_extra_is_declared_and_installed_by_the_scripts():
    setup = (ROOT / "setup.py").read_text()
    assert '"hf": ["transformers>=4.40,<5", "safetensors"]' in setup
    # quickstart.sh and test.sh both source setup_env.sh, which installs the project with the extra.
    assert 'pip install -q -e "$ROOT[hf]"' in (ROOT / "scripts" / "setup_env.sh").read_text()
    for script in ("quickstart.sh", "test.sh"):
        assert 'source "$ROOT/scripts/setup_env.sh"' in (ROOT / "scripts" / script).read_text()
