"""The interface every tokenizer exposes (Megatron-LM's `AbstractTokenizer`), and file checks they share.

A tokenizer maps text to a list of integer ids and back. Besides `tokenize`/`detokenize` it names its
special tokens through properties. A token the tokenizer does not have raises NotImplementedError, as in
Megatron-LM (so a model that needs, say, a [MASK] id fails loudly instead of training on a wrong id).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod


class TokenizerConfigError(ValueError):
    """A user error in the tokenizer settings: a missing flag, a missing or unreadable file, an unknown type.

    The message names the flag or the path; command-line tools print it and exit non-zero.
    """


def require_file(path: str | None, flag: str, tokenizer_type: str) -> str:
    """Return `path` if it names an existing file; otherwise raise TokenizerConfigError naming `flag` and path."""
    if path is None:
        raise TokenizerConfigError(f"{tokenizer_type} needs {flag}")
    if not os.path.isfile(path):
        raise TokenizerConfigError(f"{flag}: no such file: {path}")
    return path


def sentinel_tokens(count: int) -> list[str]:
    """The T5 sentinels of --vocab-extra-ids: <extra_id_0>, <extra_id_1>, ... (Megatron-LM's names)."""
    if count < 0:
        raise TokenizerConfigError(f"--vocab-extra-ids must be >= 0 (got {count})")
    return [f"<extra_id_{i}>" for i in range(count)]


class AbstractTokenizer(ABC):
    """Megatron's tokenizer interface: vocabulary, text <-> ids, and the ids of special tokens."""

    name: str = "AbstractTokenizer"

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (before padding; see `vocab_size_with_padding`)."""

    @property
    @abstractmethod
    def vocab(self) -> dict[str, int]:
        """Token string -> id."""

    @property
    @abstractmethod
    def inv_vocab(self) -> dict[int, str]:
        """Id -> token string."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Text -> token ids."""

    @abstractmethod
    def detokenize(self, ids: list[int]) -> str:
        """Token ids -> text."""

    def _missing(self, what: str) -> NotImplementedError:
        return NotImplementedError(f"{self.name} has no {what} token")

    @property
    def cls(self) -> int:
        raise self._missing("CLS")

    @property
    def sep(self) -> int:
        raise self._missing("SEP")

    @property
    def pad(self) -> int:
        raise self._missing("PAD")

    @property
    def eod(self) -> int:
        raise self._missing("end-of-document")

    @property
    def mask(self) -> int:
        raise self._missing("MASK")

    @property
    def bos(self) -> int:
        raise self._missing("BOS")

    @property
    def eos(self) -> int:
        raise self._missing("EOS")


class DictVocabTokenizer(AbstractTokenizer):
    """A tokenizer whose vocabulary is held as two dicts, `self._vocab` (token -> id) and `self._inv_vocab`
    (id -> token), set by the subclass's constructor; the vocabulary size is the number of tokens."""

    _vocab: dict[str, int]
    _inv_vocab: dict[int, str]

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        return self._inv_vocab
