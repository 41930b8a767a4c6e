"""Flags of the data (dataset prefixes, blending weights, split) and the tokenizer."""

from __future__ import annotations

import argparse
import os
from typing import Callable, NoReturn


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data and tokenizer")
    g.add_argument(
        "--data-path",
        nargs="*",
        default=None,
        help="One dataset prefix, or weights and prefixes: 0.3 a_text_document 0.7 b_text_document.",
    )
    g.add_argument("--split", type=str, default="969, 30, 1", help="Train/valid/test proportions.")
    g.add_argument("--data-cache-path", type=str, default=None, help="Where to cache sample indices.")
    g.add_argument("--mock-data", action="store_true", help="Synthetic data instead of --data-path.")
    g.add_argument(
        "--tokenizer-type",
        choices=[
            "GPT2BPETokenizer",
            "BertWordPieceLowerCase",
            "BertWordPieceCase",
            "SentencePieceTokenizer",
            "HuggingFaceTokenizer",
            "Llama2Tokenizer",
            "NullTokenizer",
        ],
        default=None,
    )
    g.add_argument("--vocab-file", type=str, default=None, help="Vocabulary file.")
    g.add_argument("--merge-file", type=str, default=None, help="BPE merges file.")
    g.add_argument("--tokenizer-model", type=str, default=None, help="SentencePiece model or HF tokenizer.")
    g.add_argument("--vocab-size", type=int, default=None, help="Vocabulary size for NullTokenizer.")
    g.add_argument("--vocab-extra-ids", type=int, default=0)
    g.add_argument("--mask-prob", type=float, default=0.15, help="BERT: fraction of tokens masked.")
    g.add_argument("--short-seq-prob", type=float, default=0.1, help="BERT: probability of a short sample.")
    g.add_argument("--reset-position-ids", action="store_true")
    g.add_argument("--reset-attention-mask", action="store_true")
    g.add_argument("--eod-mask-loss", action="store_true", help="Do not train on end-of-document tokens.")


def check_data_args(args: argparse.Namespace, fail: Callable[[str], NoReturn], require_data: bool) -> None:
    """--data-path (pairs of weight and prefix, files present), --mock-data, --split, the tokenizer's files."""
    if require_data and not args.mock_data and not args.data_path:
        fail("give --data-path PREFIX (or weights and prefixes), or --mock-data")
    if args.data_path and args.mock_data:
        fail("--data-path and --mock-data are mutually exclusive")
    if args.data_path and len(args.data_path) > 1:
        if len(args.data_path) % 2 != 0:
            fail("--data-path with several datasets takes pairs: WEIGHT PREFIX WEIGHT PREFIX ...")
        for weight in args.data_path[0::2]:
            try:
                float(weight)
            except ValueError:
                fail(f"--data-path: expected a weight, got {weight!r} (pairs: WEIGHT PREFIX ...)")
    if args.data_path:
        prefixes = args.data_path if len(args.data_path) == 1 else args.data_path[1::2]
        for prefix in prefixes:
            missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
            if missing:
                fail(
                    f"--data-path {prefix}: no {' or '.join(prefix + ext for ext in missing)} (give the prefix "
                    "that tools/preprocess_data.py wrote, e.g. corpus_text_document)"
                )
    try:
        split = [float(s) for s in args.split.replace("/", ",").split(",") if s.strip()]
    except ValueError:
        fail(f"--split {args.split!r} must be comma-separated numbers such as 969,30,1")
    if not split or any(s < 0 for s in split) or sum(split) <= 0:
        fail(f"--split {args.split!r} must be non-negative numbers with a positive sum")
    if args.tokenizer_type is None and args.vocab_size is not None:
        args.tokenizer_type = "NullTokenizer"
    if args.tokenizer_type is None:
        fail("--tokenizer-type is required (or --vocab-size for NullTokenizer)")
    needs = {
        "GPT2BPETokenizer": ("vocab_file", "merge_file"),
        "BertWordPieceLowerCase": ("vocab_file",),
        "BertWordPieceCase": ("vocab_file",),
        "SentencePieceTokenizer": ("tokenizer_model",),
        "HuggingFaceTokenizer": ("tokenizer_model",),
        "Llama2Tokenizer": ("tokenizer_model",),
        "NullTokenizer": ("vocab_size",),
    }[args.tokenizer_type]
    for flag in needs:
        if getattr(args, flag) is None:
            fail(f"--tokenizer-type {args.tokenizer_type} needs --{flag.replace('_', '-')}")
