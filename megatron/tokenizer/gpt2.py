"""OpenAI GPT-2's byte-level BPE, giving exactly the ids of OpenAI's `encoder.py` (and Megatron-LM's copy).

Files: `--vocab-file` is GPT-2's `encoder.json`/`vocab.json` (token string -> id) and `--merge-file` its
`vocab.bpe`/`merges.txt` (a `#version` line, then one merge "a b" per line, highest priority first).

The algorithm:
1. split the text with GPT-2's regex (`GPT2_SPLIT_PATTERN`, run by the `regex` module as in encoder.py);
2. map each piece's UTF-8 bytes to printable characters (GPT-2's `bytes_to_unicode`, e.g. space -> "Ġ");
3. repeatedly merge the adjacent pair with the lowest merge rank until no listed pair remains;
4. look the resulting symbols up in the vocabulary.
Steps 2-4 run in the Rust `tokenizers` library (a BPE model behind a ByteLevel pre-tokenizer that only maps
bytes). Like encoder.py, we keep a cache of piece -> ids, so a frequent word costs a dict lookup. Splitting
in Python and calling Rust only for new pieces is ~4x faster on English text than the library's own
regex pre-tokenizer, whose splitting dominates its cost. The cache is emptied when it holds
`CACHE_SIZE` pieces, which bounds its memory.

Decoding concatenates the token strings, maps characters back to bytes and decodes UTF-8 with
replacement characters for invalid bytes (OpenAI's `errors='replace'`).

`<|endoftext|>` (id 50256 in GPT-2) is the end-of-document id. As in OpenAI's and Megatron-LM's code it is
*not* recognised inside text: the string "<|endoftext|>" in a document is tokenized as ordinary characters.

`vocab_extra_ids` T5 sentinels <extra_id_0>, ... get the ids after the vocabulary (50257, ... for GPT-2),
as Megatron-LM's BERT and SentencePiece tokenizers add them (its GPT-2 tokenizer drops the flag). Like
<|endoftext|> they are ids only: text never tokenizes to them; detokenize writes their names.
"""

from __future__ import annotations

import regex
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from .base import DictVocabTokenizer, TokenizerConfigError, require_file, sentinel_tokens

EOD_TOKEN = "<|endoftext|>"
GPT2_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
CACHE_SIZE = 1 << 18


class GPT2BPETokenizer(DictVocabTokenizer):
    """GPT-2 byte-level BPE from a vocab.json + merges.txt pair."""

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str | None, merge_file: str | None, vocab_extra_ids: int = 0) -> None:
        require_file(vocab_file, "--vocab-file", self.name)
        require_file(merge_file, "--merge-file", self.name)
        try:
            model = models.BPE.from_file(vocab_file, merge_file)
        except Exception as error:  # the Rust loader reports JSON/merge syntax errors as plain Exception
            raise TokenizerConfigError(
                f"cannot read GPT-2 BPE files --vocab-file {vocab_file} --merge-file {merge_file}: {error}"
            ) from error
        self._tokenizer = Tokenizer(model)
        self._tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        self._tokenizer.decoder = decoders.ByteLevel()
        self._vocab = self._tokenizer.get_vocab(with_added_tokens=False)
        self._inv_vocab = {i: token for token, i in self._vocab.items()}
        if EOD_TOKEN not in self._vocab:
            raise TokenizerConfigError(f"--vocab-file {vocab_file} has no {EOD_TOKEN} token")
        self._eod = self._vocab[EOD_TOKEN]
        self._bpe_size = len(self._vocab)
        self.additional_special_tokens = sentinel_tokens(vocab_extra_ids)
        for (
            token
        ) in self.additional_special_tokens:  # Megatron's add_token: a token already there keeps its id
            if token not in self._vocab:
                self._vocab[token] = len(self._vocab)
                self._inv_vocab[self._vocab[token]] = token
        self._split = regex.compile(GPT2_SPLIT_PATTERN)
        self._cache: dict[str, list[int]] = {}

    def tokenize(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.findall(text):
            piece_ids = self._cache.get(piece)
            if piece_ids is None:
                piece_ids = self._encode_piece(piece)
            ids.extend(piece_ids)
        return ids

    def _encode_piece(self, piece: str) -> list[int]:
        """BPE of one regex piece (steps 2-4), remembered in the cache."""
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        piece_ids = self._tokenizer.encode(piece, add_special_tokens=False).ids
        self._cache[piece] = piece_ids
        return piece_ids

    def detokenize(self, ids: list[int]) -> str:
        """Byte-level decoding of runs of BPE ids; a sentinel id gives its name."""
        text, run = [], []
        for i in (int(i) for i in ids):
            if i < self._bpe_size:
                run.append(i)
                continue
            text.append(self._tokenizer.decode(run, skip_special_tokens=False) if run else "")
            text.append(self._inv_vocab[i])
            run = []
        text.append(self._tokenizer.decode(run, skip_special_tokens=False) if run else "")
        return "".join(text)

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        """Ids of the T5 sentinels <extra_id_i>, in order."""
        return [self._vocab[token] for token in self.additional_special_tokens]

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def eos(self) -> int:
        return self._eod
