"""The Hugging Face packages the converters import (setup.py's extra "hf"), and what to say when one is missing."""

from __future__ import annotations

HF_PACKAGES = ("safetensors", "transformers")
INSTALL = (
    "pip install -e '.[hf]' (the project's hf extra), or pip install safetensors 'transformers>=4.40,<5'"
)


def missing_package_exit(error: ModuleNotFoundError, script: str) -> SystemExit:
    """SystemExit with a one-line message naming the missing package and the install command; the error
    itself is re-raised when it is about another module (a genuine bug, not a missing extra)."""
    package = (error.name or "").split(".")[0]
    if package not in HF_PACKAGES:
        raise error
    return SystemExit(
        f"error: {script} needs the Hugging Face packages {' and '.join(HF_PACKAGES)}; "
        f"{package} is not installed: {INSTALL}"
    )
