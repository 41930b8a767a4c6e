"""Train a tokenizer on a JSONL corpus, written in the file format its Megatron tokenizer type loads.

    python tools/train_tokenizer.py --input corpus.jsonl --tokenizer-type GPT2BPETokenizer \\
        --vocab-size 32000 --output-dir my-tokenizer

--tokenizer-type             trains                                    writes (in --output-dir)
GPT2BPETokenizer             byte-level BPE with GPT-2's regex and      vocab.json + merges.txt
                             byte alphabet; <|endoftext|> is id 0
BertWordPieceLowerCase/Case  BERT WordPiece ([PAD] [UNK] [CLS] [SEP]    vocab.txt
                             [MASK] are ids 0-4), lowercased or not
SentencePieceTokenizer       a SentencePiece unigram or BPE model       sentencepiece.model + .vocab

With `--output-prefix NAME` the files are called NAME-vocab.json and so on. The text of each `--json-keys`
key (default text) of each JSON line is used; SentencePiece trains on its non-empty lines. `--vocab-size`
is the size the trainer aims at (BPE and WordPiece stop early on a small corpus). The run prints the
flags that load the result. Files are written to a temporary folder and renamed into place at the end;
a bad input line stops the run with a message naming the file and line, and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import IO, Optional

import sentencepiece
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from megatron.tokenizer.bert import REQUIRED_TOKENS as BERT_SPECIAL_TOKENS
from megatron.tokenizer.gpt2 import EOD_TOKEN

TOKENIZER_TYPES = (
    "GPT2BPETokenizer",
    "BertWordPieceLowerCase",
    "BertWordPieceCase",
    "SentencePieceTokenizer",
)
BYTE_ALPHABET_SIZE = 256


def get_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="Training corpus, JSONL (.gz allowed).")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys whose text is used.")
    parser.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    parser.add_argument("--vocab-size", type=int, required=True, help="Target vocabulary size.")
    parser.add_argument(
        "--output-dir", required=True, help="Folder for the tokenizer files (created if needed)."
    )
    parser.add_argument("--output-prefix", default="", help="Optional name put before each file name.")
    parser.add_argument("--min-frequency", type=int, default=2, help="BPE/WordPiece: least count of a merge.")
    parser.add_argument(
        "--sentencepiece-model-type",
        choices=("unigram", "bpe"),
        default="unigram",
        help="SentencePiece algorithm.",
    )
    args = parser.parse_args(argv)
    if not os.path.isfile(args.input):
        parser.error(f"--input: no such file: {args.input}")
    least = (
        BYTE_ALPHABET_SIZE + 1 if args.tokenizer_type == "GPT2BPETokenizer" else len(BERT_SPECIAL_TOKENS) + 1
    )
    if args.vocab_size < least:
        parser.error(
            f"--vocab-size must be at least {least} for {args.tokenizer_type} (got {args.vocab_size})"
        )
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        parser.error(f"--output-dir {args.output_dir} exists and is not a directory")
    if os.sep in args.output_prefix:
        parser.error(f"--output-prefix is a file name prefix, not a path (got {args.output_prefix!r})")
    return args


class JsonlTexts:
    """Iterates over the texts of `keys` in a JSONL file; stops at the first bad line and keeps its message.

    Tokenizer trainers consume the iterator inside native code, which may swallow or rewrap an exception,
    so a bad line ends the iteration and `error` tells the caller what went wrong (None if nothing did).
    """

    def __init__(self, path: str, keys: list[str]) -> None:
        self.path = path
        self.keys = keys
        self.error: Optional[str] = None

    def _open(self) -> IO[str]:
        if self.path.endswith(".gz"):
            return gzip.open(self.path, "rt", encoding="utf-8")
        return open(self.path, encoding="utf-8")  # noqa: SIM115 - closed by the caller's with

    def __iter__(self) -> Iterator[str]:
        line_number = 0
        try:
            with self._open() as f:
                for line_number, line in enumerate(f, start=1):  # noqa: B007 - used in the error message
                    if line.strip():
                        yield from self._texts(line, line_number)
                        if self.error is not None:
                            return
        except (OSError, EOFError, UnicodeDecodeError) as error:
            self.error = f"{self.path}:{line_number + 1}: cannot read the input: {error}"

    def _texts(self, line: str, line_number: int) -> Iterator[str]:
        where = f"{self.path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            self.error = f"{where}: malformed JSON: {error.msg} (column {error.colno})"
            return
        if not isinstance(record, dict):
            self.error = f"{where}: expected a JSON object, got {type(record).__name__}"
            return
        for key in self.keys:
            if key not in record:
                self.error = f"{where}: JSON key '{key}' not found (keys on this line: {sorted(record)})"
                return
            value = record[key]
            if isinstance(value, str):
                yield value
            elif isinstance(value, list) and all(isinstance(s, str) for s in value):
                yield from value
            else:
                self.error = f"{where}: JSON key '{key}' must hold a string or a list of strings"
                return


def output_name(prefix: str, stem: str) -> str:
    return f"{prefix}-{stem}" if prefix else stem


def train_gpt2_bpe(texts: JsonlTexts, args: argparse.Namespace, workdir: str) -> dict[str, str]:
    """Byte-level BPE exactly as GPT-2's tokenizer applies it; returns {file name: path in workdir}."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    vocab_path, merges_path = tokenizer.model.save(workdir)
    return {"vocab.json": vocab_path, "merges.txt": merges_path}


def train_wordpiece(texts: JsonlTexts, args: argparse.Namespace, workdir: str) -> dict[str, str]:
    """BERT WordPiece with BERT's normalisation and pre-tokenization; writes vocab.txt (one token per line)."""
    lower_case = args.tokenizer_type == "BertWordPieceLowerCase"
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lower_case, lowercase=lower_case
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        special_tokens=list(BERT_SPECIAL_TOKENS),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    path = os.path.join(workdir, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        for token in sorted(vocab, key=vocab.__getitem__):
            f.write(token + "\n")
    return {"vocab.txt": path}


def train_sentencepiece(texts: JsonlTexts, args: argparse.Namespace, workdir: str) -> dict[str, str]:
    """A SentencePiece model trained on the corpus's non-empty lines."""
    lines = (line for text in texts for line in text.split("\n") if line.strip())
    model_prefix = os.path.join(workdir, "sentencepiece")
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_prefix=model_prefix,
            vocab_size=args.vocab_size,
            model_type=args.sentencepiece_model_type,
            minloglevel=2,
        )
    except RuntimeError as error:
        if texts.error is not None:  # the trainer failed because the input stopped early
            return {}
        raise SystemExit(f"error: SentencePiece training failed: {error}") from None
    return {"sentencepiece.model": model_prefix + ".model", "sentencepiece.vocab": model_prefix + ".vocab"}


TRAINERS = {
    "GPT2BPETokenizer": train_gpt2_bpe,
    "BertWordPieceLowerCase": train_wordpiece,
    "BertWordPieceCase": train_wordpiece,
    "SentencePieceTokenizer": train_sentencepiece,
}


def usage_hint(args: argparse.Namespace, paths: dict[str, str]) -> str:
    """The preprocess/training flags that load the trained files."""
    flags = f"--tokenizer-type {args.tokenizer_type}"
    if "vocab.json" in paths:
        return f"{flags} --vocab-file {paths['vocab.json']} --merge-file {paths['merges.txt']}"
    if "vocab.txt" in paths:
        return f"{flags} --vocab-file {paths['vocab.txt']}"
    return f"{flags} --tokenizer-model {paths['sentencepiece.model']}"


def train(args: argparse.Namespace) -> dict[str, str]:
    """Train and move the files into --output-dir; return {file role: final path}. SystemExit on bad input."""
    created_dir = not os.path.isdir(args.output_dir)
    os.makedirs(args.output_dir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=".train_tokenizer-", dir=args.output_dir)
    try:
        texts = JsonlTexts(args.input, args.json_keys)
        written = TRAINERS[args.tokenizer_type](texts, args, workdir)
        if texts.error is not None:
            raise SystemExit(f"error: {texts.error}")
        final = {}
        for role, path in written.items():
            final[role] = os.path.join(args.output_dir, output_name(args.output_prefix, role))
            os.replace(path, final[role])
        return final
    except BaseException:
        if created_dir:
            shutil.rmtree(args.output_dir, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> None:
    args = get_args(argv)
    try:
        paths = train(args)
    except OSError as error:  # e.g. an unwritable --output-dir; the message names the path
        raise SystemExit(f"error: {error}") from None
    for path in paths.values():
        print(f"wrote {path}")
    print(f"load it with: {usage_hint(args, paths)}")


if __name__ == "__main__":
    main()
