"""NullTokenizer: the text already is token ids, written as decimal integers separated by whitespace.

Megatron-LM's semantics: with `--vocab-size V`, ids 0..V-1 are ordinary tokens and V is the
end-of-document id, so `vocab_size` is V + 1 and `eod == vocab_size - 1`. CLS/SEP/MASK are -1 (Megatron's
placeholders). With `vocab_extra_ids` N, ids V+1 .. V+N are the T5 sentinels <extra_id_0> .. (as
Megatron-LM's BERT and SentencePiece tokenizers add them; its NullTokenizer drops the flag) and
`vocab_size` is V + 1 + N. An id outside [0, vocab_size) is refused, since it could not be embedded.
"""

from __future__ import annotations

from .base import AbstractTokenizer, TokenizerConfigError, sentinel_tokens


class NullTokenizer(AbstractTokenizer):
    """Identity "tokenizer" for pre-tokenized text such as "17 3 52"."""

    name = "NullTokenizer"

    def __init__(self, vocab_size: int | None, vocab_extra_ids: int = 0) -> None:
        if vocab_size is None or int(vocab_size) <= 0:
            raise TokenizerConfigError(f"{self.name} needs --vocab-size > 0 (got {vocab_size})")
        self._eod = int(vocab_size)
        self.additional_special_tokens = sentinel_tokens(vocab_extra_ids)

    @property
    def vocab_size(self) -> int:
        return self._eod + 1 + len(self.additional_special_tokens)

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        """Ids of the T5 sentinels <extra_id_i>, in order (right after the end-of-document id)."""
        return list(range(self._eod + 1, self.vocab_size))

    @property
    def vocab(self) -> dict[str, int]:
        raise NotImplementedError(f"{self.name} has no vocabulary")

    @property
    def inv_vocab(self) -> dict[int, str]:
        raise NotImplementedError(f"{self.name} has no vocabulary")

    def tokenize(self, text: str) -> list[int]:
        """ "12 7 3" -> [12, 7, 3]; raises ValueError for a word that is not an id in [0, vocab_size)."""
        ids = []
        for word in text.split():
            try:
                token_id = int(word)
            except ValueError:
                raise ValueError(f"{self.name}: {word!r} is not an integer token id") from None
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"{self.name}: token id {token_id} is outside [0, {self.vocab_size})")
            ids.append(token_id)
        return ids

    def detokenize(self, ids: list[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    @property
    def cls(self) -> int:
        return -1

    @property
    def sep(self) -> int:
        return -1

    @property
    def mask(self) -> int:
        return -1

    @property
    def eod(self) -> int:
        return self._eod
