"""Choose and build a tokenizer from settings named like Megatron-LM's flags; pad the vocabulary size.

    tokenizer = build_tokenizer(config)
    padded = vocab_size_with_padding(tokenizer.vocab_size, config.make_vocab_size_divisible_by,
                                     config.tensor_model_parallel_size)

`build_tokenizer` only reads `config`; it does not set `padded_vocab_size` on it (unlike Megatron-LM).
The caller computes the padded size with `vocab_size_with_padding` and stores it where it wants.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from .base import AbstractTokenizer, TokenizerConfigError
from .bert import BertWordPieceTokenizer
from .gpt2 import GPT2BPETokenizer
from .huggingface import HuggingFaceTokenizer
from .llama2 import Llama2Tokenizer
from .null import NullTokenizer
from .sentencepiece_tokenizer import SentencePieceTokenizer

_BUILDERS: dict[str, Callable[[Any], AbstractTokenizer]] = {
    "GPT2BPETokenizer": lambda c: GPT2BPETokenizer(c.vocab_file, c.merge_file),
    "BertWordPieceLowerCase": lambda c: BertWordPieceTokenizer(
        c.vocab_file, lower_case=True, vocab_extra_ids=getattr(c, "vocab_extra_ids", 0)
    ),
    "BertWordPieceCase": lambda c: BertWordPieceTokenizer(
        c.vocab_file, lower_case=False, vocab_extra_ids=getattr(c, "vocab_extra_ids", 0)
    ),
    "SentencePieceTokenizer": lambda c: SentencePieceTokenizer(
        c.tokenizer_model, vocab_extra_ids=getattr(c, "vocab_extra_ids", 0)
    ),
    "HuggingFaceTokenizer": lambda c: HuggingFaceTokenizer(c.tokenizer_model),
    "Llama2Tokenizer": lambda c: Llama2Tokenizer(c.tokenizer_model),
    "NullTokenizer": lambda c: NullTokenizer(c.vocab_size),
}
TOKENIZER_TYPES: tuple[str, ...] = tuple(_BUILDERS)


def build_tokenizer(config: Any) -> AbstractTokenizer:
    """Build the tokenizer named by `config.tokenizer_type`.

    `config` is any object with the attributes tokenizer_type, vocab_file, merge_file, tokenizer_model,
    vocab_size and (optionally) vocab_extra_ids; an attribute the chosen type does not use may be absent.
    Raises TokenizerConfigError (naming the flag or file) for an unknown type or a missing/bad file.
    """
    tokenizer_type = getattr(config, "tokenizer_type", None)
    if tokenizer_type not in _BUILDERS:
        raise TokenizerConfigError(
            f"--tokenizer-type {tokenizer_type!r} is not one of: {', '.join(TOKENIZER_TYPES)}"
        )
    settings = argparse.Namespace(
        vocab_file=getattr(config, "vocab_file", None),
        merge_file=getattr(config, "merge_file", None),
        tokenizer_model=getattr(config, "tokenizer_model", None),
        vocab_size=getattr(config, "vocab_size", None),
        vocab_extra_ids=getattr(config, "vocab_extra_ids", 0) or 0,
    )
    return _BUILDERS[tokenizer_type](settings)


def vocab_size_with_padding(
    orig_vocab_size: int, make_vocab_size_divisible_by: int = 128, tensor_model_parallel_size: int = 1
) -> int:
    """Round the vocabulary up to a multiple of `make_vocab_size_divisible_by * tensor_model_parallel_size`.

    padded = ceil(orig / m) * m with m = divisible_by * tp, so each tensor-parallel rank holds an equal,
    GPU-friendly slice of the embedding (e.g. GPT-2's 50257 -> 50304 with m = 128). The extra rows are
    never produced by the tokenizer.
    """
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    if multiple <= 0:
        raise ValueError(
            "--make-vocab-size-divisible-by and --tensor-model-parallel-size must be positive "
            f"(got {make_vocab_size_divisible_by} and {tensor_model_parallel_size})"
        )
    return -(-orig_vocab_size // multiple) * multiple


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add Megatron-LM's tokenizer flags to `parser` (shared by the tools that build a tokenizer)."""
    group = parser.add_argument_group(title="tokenizer")
    group.add_argument(
        "--tokenizer-type", required=True, choices=TOKENIZER_TYPES, help="What type of tokenizer to use."
    )
    group.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json/encoder.json or BERT vocab.txt.")
    group.add_argument("--merge-file", default=None, help="GPT-2 merges.txt/vocab.bpe.")
    group.add_argument(
        "--tokenizer-model", default=None, help="SentencePiece .model, or a tokenizer.json (or its folder)."
    )
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer: number of ordinary ids.")
    group.add_argument("--vocab-extra-ids", type=int, default=0, help="Number of T5 <extra_id_i> sentinels.")
    group.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=128,
        help="Pad the vocabulary to a multiple of this.",
    )
    group.add_argument(
        "--tensor-model-parallel-size", type=int, default=1, help="Also pad for this TP degree."
    )
    return parser
