"""BERT's WordPiece tokenizer (Google's `tokenization.FullTokenizer`, as used by Megatron-LM).

File: `--vocab-file` is BERT's `vocab.txt`, one token per line; a token's id is its line number (from 0).
It must contain [PAD], [UNK], [CLS], [SEP] and [MASK].

The algorithm, run by the Rust `tokenizers` library:
1. clean the text (drop control characters and U+FFFD, map every whitespace character to a space) and put
   spaces around CJK ideographs;
2. lowercase and strip accents (NFD, drop combining marks), for BertWordPieceLowerCase only;
3. split on whitespace and on every punctuation character;
4. split each word greedily into the longest vocabulary prefix, then the longest "##"-continuation, and
   so on; a word with no such split, or longer than 200 characters (Google's limit), becomes [UNK].
Detokenizing joins the tokens with spaces and glues "##" pieces to the previous token (Megatron's
`convert_tokens_to_string`).

As in Megatron-LM, [BOS] and [EOS] are appended to the vocabulary after the file's tokens when the file
lacks them (so bert-base-uncased's 30522 tokens become vocab_size 30524), followed by `vocab_extra_ids`
T5 sentinels <extra_id_0>, ... . Such added tokens are ids only: text never tokenizes to them. `eod` is
the [EOS] id.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from .base import DictVocabTokenizer, TokenizerConfigError, require_file

REQUIRED_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_INPUT_CHARS_PER_WORD = 200


def read_vocab_txt(vocab_file: str) -> dict[str, int]:
    """vocab.txt -> {token: line number}. A token is the line with surrounding whitespace removed."""
    vocab: dict[str, int] = {}
    with open(vocab_file, encoding="utf-8") as f:
        for index, line in enumerate(f):
            vocab.setdefault(line.strip(), index)
    return vocab


class BertWordPieceTokenizer(DictVocabTokenizer):
    """BERT WordPiece; `lower_case` selects BertWordPieceLowerCase (True) or BertWordPieceCase (False)."""

    def __init__(self, vocab_file: str | None, lower_case: bool = True, vocab_extra_ids: int = 0) -> None:
        self.name = "BertWordPieceLowerCase" if lower_case else "BertWordPieceCase"
        require_file(vocab_file, "--vocab-file", self.name)
        try:
            file_vocab = read_vocab_txt(vocab_file)
        except UnicodeDecodeError as error:
            raise TokenizerConfigError(f"--vocab-file {vocab_file} is not UTF-8 text: {error}") from error
        missing = [token for token in REQUIRED_TOKENS if token not in file_vocab]
        if missing:
            raise TokenizerConfigError(f"--vocab-file {vocab_file} lacks BERT's special tokens {missing}")

        self._tokenizer = Tokenizer(
            models.WordPiece(file_vocab, unk_token="[UNK]", max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD)
        )
        self._tokenizer.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=lower_case, lowercase=lower_case
        )
        self._tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        self._tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)

        self._vocab = dict(file_vocab)
        self._inv_vocab = {i: token for token, i in self._vocab.items()}
        self.additional_special_tokens = [f"<extra_id_{i}>" for i in range(vocab_extra_ids)]
        for token in ["[BOS]", "[EOS]", *self.additional_special_tokens]:
            self._add_token(token)

    def _add_token(self, token: str) -> None:
        """Give `token` the next free id unless the vocabulary already has it (Megatron's add_token)."""
        if token not in self._vocab:
            new_id = len(self._vocab)
            self._vocab[token] = new_id
            self._inv_vocab[new_id] = token

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: list[int]) -> str:
        tokens = [self._inv_vocab[int(i)] for i in ids]
        return " ".join(tokens).replace(" ##", "").strip()

    @property
    def cls(self) -> int:
        return self._vocab["[CLS]"]

    @property
    def sep(self) -> int:
        return self._vocab["[SEP]"]

    @property
    def pad(self) -> int:
        return self._vocab["[PAD]"]

    @property
    def mask(self) -> int:
        return self._vocab["[MASK]"]

    @property
    def bos(self) -> int:
        return self._vocab["[BOS]"]

    @property
    def eos(self) -> int:
        return self._vocab["[EOS]"]

    @property
    def eod(self) -> int:
        return self.eos

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        """Ids of the T5 sentinels <extra_id_i>, in order."""
        return [self._vocab[token] for token in self.additional_special_tokens]
