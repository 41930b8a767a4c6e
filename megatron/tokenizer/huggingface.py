"""A Hugging Face `tokenizer.json` (`--tokenizer-model`: the file, or a folder that contains one).

The `tokenizers` library runs the whole pipeline the file describes (normalizer, pre-tokenizer, model,
post-processor, decoder). As in Megatron-LM's `_HuggingFaceTokenizer` (which calls a transformers
tokenizer), `tokenize` applies the post-processor, so a BERT-style file adds [CLS] ... [SEP] and a
Llama-style file adds <s>; `detokenize` keeps special tokens. Any truncation or padding stored in the
file is switched off, as transformers does when it loads one.

Which token is eos/bos/pad/cls/sep/mask is not stored in tokenizer.json; it is read from
`tokenizer_config.json` and then `special_tokens_map.json` (which wins) in the same folder, the way
transformers reads them. A role that neither file names gives None (like transformers' `eos_token_id`).
`eod` is the eos id, as in Megatron-LM.

`vocab_extra_ids` adds the T5 sentinels <extra_id_0>, ... as special tokens (recognised in text, as a T5
tokenizer.json has them), after the file's vocabulary; those the file already has keep their ids.
Megatron-LM's HuggingFaceTokenizer drops the flag.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

from tokenizers import Tokenizer

from .base import DictVocabTokenizer, TokenizerConfigError, sentinel_tokens

TOKENIZER_FILE = "tokenizer.json"
SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # later files override earlier ones
ROLES = ("eos", "bos", "pad", "cls", "sep", "mask", "unk")


def _token_content(value: Any) -> Optional[str]:
    """A special-token entry is either the token string or an AddedToken dict with a "content" field."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def read_special_tokens(folder: str) -> dict[str, str]:
    """{role: token string} for the roles in ROLES named by the JSON side files of `folder`."""
    tokens: dict[str, str] = {}
    for name in SIDE_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as error:
            raise TokenizerConfigError(f"cannot read {path}: {error}") from error
        for role in ROLES:
            content = _token_content(config.get(f"{role}_token")) if isinstance(config, dict) else None
            if content is not None:
                tokens[role] = content
    return tokens


class HuggingFaceTokenizer(DictVocabTokenizer):
    """Any tokenizer saved as tokenizer.json by the `tokenizers`/transformers libraries."""

    name = "HuggingFaceTokenizer"

    def __init__(self, path: str | None, vocab_extra_ids: int = 0) -> None:
        if path is None:
            raise TokenizerConfigError(
                f"{self.name} needs --tokenizer-model (a tokenizer.json file or a folder holding one)"
            )
        file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise TokenizerConfigError(f"--tokenizer-model: no such file: {file}")
        try:
            self._tokenizer = Tokenizer.from_file(file)
        except Exception as error:  # the Rust loader reports malformed files as plain Exception
            raise TokenizerConfigError(
                f"--tokenizer-model {file} is not a tokenizer.json: {error}"
            ) from error
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.additional_special_tokens = sentinel_tokens(vocab_extra_ids)
        self._tokenizer.add_special_tokens(self.additional_special_tokens)
        self._vocab = self._tokenizer.get_vocab(with_added_tokens=True)
        self._inv_vocab = {i: token for token, i in self._vocab.items()}
        folder = os.path.dirname(os.path.abspath(file))
        self._role_ids = {
            role: self._tokenizer.token_to_id(token) for role, token in read_special_tokens(folder).items()
        }

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        """Ids of the T5 sentinels <extra_id_i>, in order."""
        return [self._vocab[token] for token in self.additional_special_tokens]

    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.encode(text).ids

    def detokenize(self, ids: list[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def eod(self) -> Optional[int]:
        return self._role_ids.get("eos")

    @property
    def eos(self) -> Optional[int]:
        return self._role_ids.get("eos")

    @property
    def bos(self) -> Optional[int]:
        return self._role_ids.get("bos")

    @property
    def pad(self) -> Optional[int]:
        return self._role_ids.get("pad")

    @property
    def cls(self) -> Optional[int]:
        return self._role_ids.get("cls")

    @property
    def sep(self) -> Optional[int]:
        return self._role_ids.get("sep")

    @property
    def mask(self) -> Optional[int]:
        return self._role_ids.get("mask")
