"""A Llama SentencePiece model used as Llama trains with it (Megatron-LM's `Llama2Tokenizer`).

Unlike `SentencePieceTokenizer`, no special tokens are appended: the vocabulary is exactly the model's
pieces (so the ids are those of Meta's and Hugging Face's Llama tokenizers). `tokenize` prepends the
model's BOS id (<s>) to every text and appends nothing; the end-of-document id `eod` is the model's EOS
(</s>), so `tools/preprocess_data.py --append-eod` stores each document as <s> text </s>, as Llama's
pretraining data is laid out. `detokenize` is SentencePiece's decode (BOS/EOS ids are dropped).
"""

from __future__ import annotations

from .base import DictVocabTokenizer, TokenizerConfigError
from .sentencepiece_tokenizer import load_sentencepiece


class Llama2Tokenizer(DictVocabTokenizer):
    name = "Llama2Tokenizer"

    def __init__(self, model_file: str | None) -> None:
        self._processor = load_sentencepiece(model_file, self.name)
        for role, piece_id in (("BOS", self._processor.bos_id()), ("EOS", self._processor.eos_id())):
            if piece_id < 0:
                raise TokenizerConfigError(
                    f"--tokenizer-model {model_file} has no {role} piece; {self.name} needs <s> and </s> "
                    "(train it with bos_id/eos_id set, or use SentencePieceTokenizer)"
                )
        self._inv_vocab = {i: self._processor.IdToPiece(i) for i in range(self._processor.GetPieceSize())}
        self._vocab = {piece: i for i, piece in self._inv_vocab.items()}

    def tokenize(self, text: str) -> list[int]:
        return [self._processor.bos_id(), *self._processor.EncodeAsIds(text)]

    def detokenize(self, ids: list[int]) -> str:
        return self._processor.DecodeIds([int(i) for i in ids])

    @property
    def bos(self) -> int:
        return self._processor.bos_id()

    @property
    def eos(self) -> int:
        return self._processor.eos_id()

    @property
    def eod(self) -> int:
        return self._processor.eos_id()

    @property
    def pad(self) -> int:
        if self._processor.pad_id() < 0:
            raise self._missing("PAD")
        return self._processor.pad_id()
