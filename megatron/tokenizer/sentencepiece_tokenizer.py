"""A SentencePiece model (`--tokenizer-model`, a `.model` file) with Megatron-LM's special tokens.

Ids 0..n-1 are the model's pieces. As in Megatron-LM's `_SentencePieceTokenizer`, these special tokens
are then registered in order, each taking the next free id unless the model already has the piece:
<CLS>, <SEP>, <EOD>, <MASK>, the model's pad/bos/eos pieces (or <PAD>/<BOS>/<EOS> when the model has
none, i.e. its id is -1), then `vocab_extra_ids` T5 sentinels <extra_id_0>, ... . `vocab_size` counts them.

Tokenizing: the text is cut at every occurrence of a special token's string (leftmost first; at equal
positions, the token registered first); pieces of ordinary text go through SentencePiece and each special
string becomes its id. Detokenizing decodes runs of ordinary ids with SentencePiece and writes each special
token as its string surrounded by spaces (Megatron's convention).
"""

from __future__ import annotations

import re

import sentencepiece

from .base import DictVocabTokenizer, TokenizerConfigError, require_file


def load_sentencepiece(model_file: str | None, tokenizer_name: str) -> sentencepiece.SentencePieceProcessor:
    """The SentencePiece model of --tokenizer-model; a missing or unreadable file is a TokenizerConfigError."""
    require_file(model_file, "--tokenizer-model", tokenizer_name)
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(model_file)
    except (OSError, RuntimeError) as error:
        raise TokenizerConfigError(
            f"--tokenizer-model {model_file} is not a SentencePiece model: {error}"
        ) from error
    return processor


class SentencePieceTokenizer(DictVocabTokenizer):
    """SentencePiece model plus Megatron's special tokens."""

    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str | None, vocab_extra_ids: int = 0) -> None:
        self._processor = load_sentencepiece(model_file, self.name)
        n_pieces = self._processor.GetPieceSize()
        self._inv_vocab = {i: self._processor.IdToPiece(i) for i in range(n_pieces)}
        self._vocab = {piece: i for i, piece in self._inv_vocab.items()}
        self._special: dict[str, int] = {}  # insertion order = tie-break order when splitting text

        def piece_or(default: str, piece_id: int) -> str:
            return self._inv_vocab[piece_id] if 0 <= piece_id < n_pieces else default

        self._cls = self._add_special("<CLS>")
        self._sep = self._add_special("<SEP>")
        self._eod = self._add_special("<EOD>")
        self._mask = self._add_special("<MASK>")
        self._pad = self._add_special(piece_or("<PAD>", self._processor.pad_id()))
        self._bos = self._add_special(piece_or("<BOS>", self._processor.bos_id()))
        self._eos = self._add_special(piece_or("<EOS>", self._processor.eos_id()))
        self.additional_special_tokens = [f"<extra_id_{i}>" for i in range(vocab_extra_ids)]
        for token in self.additional_special_tokens:
            self._add_special(token)
        self._inv_special = {i: token for token, i in self._special.items()}
        self._special_re = re.compile("|".join(re.escape(token) for token in self._special))

    def _add_special(self, token: str) -> int:
        """Register `token` as special, appending it to the vocabulary if the model lacks it; return its id."""
        if token not in self._vocab:
            new_id = len(self._vocab)
            self._vocab[token] = new_id
            self._inv_vocab[new_id] = token
        self._special[token] = self._vocab[token]
        return self._vocab[token]

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        for match in self._special_re.finditer(text):
            ids.extend(self._processor.EncodeAsIds(text[start : match.start()]))
            ids.append(self._special[match.group()])
            start = match.end()
        ids.extend(self._processor.EncodeAsIds(text[start:]))
        return ids

    def detokenize(self, ids: list[int]) -> str:
        text = ""
        run_start = 0
        ids = [int(i) for i in ids]
        for position, token_id in enumerate(ids):
            if token_id in self._inv_special:
                text += self._processor.DecodeIds(ids[run_start:position]) + " "
                text += self._inv_special[token_id] + " "
                run_start = position + 1
        return text + self._processor.DecodeIds(ids[run_start:])

    @property
    def cls(self) -> int:
        return self._cls

    @property
    def sep(self) -> int:
        return self._sep

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def mask(self) -> int:
        return self._mask

    @property
    def pad(self) -> int:
        return self._pad

    @property
    def bos(self) -> int:
        return self._bos

    @property
    def eos(self) -> int:
        return self._eos

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        """Ids of the T5 sentinels <extra_id_i>, in order."""
        return [self._vocab[token] for token in self.additional_special_tokens]
