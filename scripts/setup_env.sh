#!/usr/bin/env bash
# Creates (once) the project-local virtual environment .venv and installs the project into it.
# Sourced by quickstart.sh and test.sh; safe to run again (idempotent).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment in $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first and pinned (CPU build): an unpinned torch would pull the multi-GB CUDA build.
if ! python -c "import torch" >/dev/null 2>&1; then
  echo "[setup] installing torch==2.13.0 (CPU build)"
  python -m pip install -q "torch==2.13.0"
fi

stamp="$VENV/.megatron_installed"
if [ ! -f "$stamp" ] || [ "$ROOT/setup.py" -nt "$stamp" ]; then
  echo "[setup] installing the project with its Hugging Face converters' packages (pip install -e .[hf])"
  python -m pip install -q -e "$ROOT[hf]"
  touch "$stamp"
fi
