"""Tokenizers with Megatron-LM's interface: `build_tokenizer(config)` and `vocab_size_with_padding(...)`."""

from .base import AbstractTokenizer, TokenizerConfigError
from .bert import BertWordPieceTokenizer
from .gpt2 import GPT2BPETokenizer
from .huggingface import HuggingFaceTokenizer
from .llama2 import Llama2Tokenizer
from .null import NullTokenizer
from .sentencepiece_tokenizer import SentencePieceTokenizer
from .tokenizer import TOKENIZER_TYPES, add_tokenizer_args, build_tokenizer, vocab_size_with_padding

__all__ = [
    "TOKENIZER_TYPES",
    "AbstractTokenizer",
    "BertWordPieceTokenizer",
    "GPT2BPETokenizer",
    "HuggingFaceTokenizer",
    "Llama2Tokenizer",
    "NullTokenizer",
    "SentencePieceTokenizer",
    "TokenizerConfigError",
    "add_tokenizer_args",
    "build_tokenizer",
    "vocab_size_with_padding",
]
