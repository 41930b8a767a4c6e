"""Clean, filter, deduplicate and decontaminate a JSONL corpus before tools/preprocess_data.py.

    python tools/prepare_corpus.py --input IN.jsonl --output OUT.jsonl --report REPORT.json --workers 4 \\
        --decontaminate lambada_test.jsonl wiki.test.tokens

Input: JSONL (plain, .gz or .zst), text under `--json-keys` (default `text`); other fields are kept.
Every stage is on by default (see megatron/corpus/__init__.py for what each does):
clean (--no-clean), language (--no-language-filter), quality (--no-quality-filter), exact + fuzzy dedup
(--no-dedup); decontamination runs when --decontaminate names evaluation files.

Across machines (a SLURM array, see scripts/prepare_corpus.sbatch), every shard runs
    --num-shards N --shard-index i --shard-dir DIR
and then one job runs `--merge --num-shards N --shard-dir DIR --output ... --report ...`, which finds the
duplicates across shards. A finished shard leaves a marker and is skipped on a rerun. The output is the
same for any number of shards and workers. The corpus tools need `pip install -e '.[corpus]'`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
from typing import Optional

from megatron.corpus.decontaminate import NgramIndex
from megatron.corpus.dedup import MinHashConfig
from megatron.corpus.documents import CorpusConfig, check_dependencies
from megatron.corpus.io import CorpusError
from megatron.corpus.merge import merge, summary
from megatron.corpus.quality import QualityThresholds
from megatron.corpus.shard import run_shard


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_quality_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("quality filter (Gopher heuristics; see megatron/corpus/quality.py)")
    group.add_argument("--no-quality-filter", action="store_true", help="Skip the quality heuristics.")
    for f in dataclasses.fields(QualityThresholds):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, tuple):
            group.add_argument(_flag("quality_" + f.name), type=float, nargs=len(default), default=default)
        else:
            group.add_argument(_flag("quality_" + f.name), type=type(default), default=default)


def get_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_argument_group("input and output")
    group.add_argument("--input", nargs="+", help="JSONL files (.gz, .zst allowed), in this order.")
    group.add_argument("--json-keys", nargs="+", default=["text"], help="Keys holding the text.")
    group.add_argument("--output", help="Cleaned JSONL file to write.")
    group.add_argument("--report", help="JSON report to write.")
    group = parser.add_argument_group("stages")
    group.add_argument("--no-clean", action="store_true", help="Skip ftfy repair and boilerplate removal.")
    group.add_argument("--no-language-filter", action="store_true", help="Keep every language.")
    group.add_argument("--languages", nargs="+", default=["en"], help="ISO 639-1 codes to keep.")
    group.add_argument(
        "--language-threshold",
        type=float,
        default=0.3,
        help="Least probability of the language (measured: benchmarks/corpus_langid.py).",
    )
    group.add_argument("--no-dedup", action="store_true", help="Skip exact and fuzzy deduplication.")
    defaults = MinHashConfig()
    group.add_argument("--minhash-ngram", type=int, default=defaults.ngram, help="Words per shingle.")
    group.add_argument("--minhash-num-perm", type=int, default=defaults.num_perm, help="Signature length.")
    group.add_argument("--minhash-bands", type=int, default=defaults.bands, help="LSH bands.")
    group.add_argument("--minhash-rows", type=int, default=defaults.rows, help="Signature values per band.")
    group.add_argument("--minhash-threshold", type=float, default=defaults.threshold, help="Least Jaccard.")
    group.add_argument("--minhash-seed", type=int, default=defaults.seed)
    group.add_argument("--decontaminate", nargs="+", default=[], metavar="FILE", help="Evaluation files.")
    group.add_argument("--decontaminate-mode", choices=["cut", "drop"], default="cut")
    group.add_argument("--decontaminate-ngram", type=int, default=13, help="Words per evaluation n-gram.")
    add_quality_args(parser)
    group = parser.add_argument_group("scale")
    group.add_argument("--workers", type=int, default=1, help="Worker processes per shard.")
    group.add_argument("--num-shards", type=int, default=None, help="Shards of a multi-job run.")
    group.add_argument("--shard-index", type=int, default=None, help="The shard this job runs.")
    group.add_argument("--shard-dir", default=None, help="Folder of the shards' results and markers.")
    group.add_argument("--merge", action="store_true", help="Merge finished shards into --output.")
    args = parser.parse_args(argv)
    validate(parser, args)
    return args


def validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.input:
        parser.error("--input is required (the same files, in the same order, for every shard and the merge)")
    for path in args.input:
        if not os.path.isfile(path):
            parser.error(f"--input: no such file: {path}")
    sharded = args.shard_index is not None
    if sharded or args.merge:
        if args.num_shards is None or args.shard_dir is None:
            parser.error("--shard-index and --merge need --num-shards and --shard-dir")
    if sharded and args.merge:
        parser.error("--shard-index and --merge are separate jobs: run every shard, then the merge")
    if args.num_shards is not None and args.num_shards < 1:
        parser.error(f"--num-shards must be >= 1 (got {args.num_shards})")
    if sharded and not 0 <= args.shard_index < args.num_shards:
        parser.error(f"--shard-index must be in [0, {args.num_shards}) (got {args.shard_index})")
    if not sharded:
        for flag in ("output", "report"):
            path = getattr(args, flag)
            if path is None:
                parser.error(f"--{flag} is required")
            if any(os.path.exists(path) and os.path.samefile(path, p) for p in args.input):
                parser.error(f"--{flag} {path} is one of the inputs")
            if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
                parser.error(f"--{flag}: directory of {path} does not exist")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1 (got {args.workers})")
    if args.minhash_bands * args.minhash_rows > args.minhash_num_perm:
        parser.error("--minhash-bands x --minhash-rows must not exceed --minhash-num-perm")
    if not 0.0 <= args.minhash_threshold <= 1.0 or not 0.0 <= args.language_threshold <= 1.0:
        parser.error("--minhash-threshold and --language-threshold are probabilities in [0, 1]")
    if args.decontaminate_ngram < 8:
        parser.error("--decontaminate-ngram must be >= 8 (shorter evaluation texts use n-grams of 8 words)")


def make_config(args: argparse.Namespace) -> CorpusConfig:
    quality = QualityThresholds(
        **{f.name: getattr(args, "quality_" + f.name) for f in dataclasses.fields(QualityThresholds)}
    )
    quality = dataclasses.replace(
        quality, max_top_ngram_chars=tuple(quality.max_top_ngram_chars),
        max_duplicate_ngram_chars=tuple(quality.max_duplicate_ngram_chars),
    )  # fmt: skip
    minhash = MinHashConfig(args.minhash_ngram, args.minhash_num_perm, args.minhash_bands, args.minhash_rows,
                            args.minhash_threshold, args.minhash_seed)  # fmt: skip
    return CorpusConfig(
        inputs=tuple(os.path.abspath(p) for p in args.input), json_keys=tuple(args.json_keys),
        clean=not args.no_clean, language_filter=not args.no_language_filter, languages=tuple(args.languages),
        language_threshold=args.language_threshold, quality_filter=not args.no_quality_filter, quality=quality,
        decontaminate=tuple(os.path.abspath(p) for p in args.decontaminate),
        decontaminate_mode=args.decontaminate_mode, decontaminate_ngram=args.decontaminate_ngram,
        dedup=not args.no_dedup, minhash=minhash,
    )  # fmt: skip


def run(args: argparse.Namespace) -> Optional[dict]:
    """Run what the flags ask (one shard, the merge, or everything here); return the report if written."""
    config = make_config(args)
    check_dependencies(config)
    ngrams = None
    if config.decontaminate and not args.merge:
        ngrams = NgramIndex.build(list(config.decontaminate), config.decontaminate_ngram)
        print(
            f"decontamination: {len(ngrams)} n-grams from {len(config.decontaminate)} files", file=sys.stderr
        )
    if args.shard_index is not None:
        done = run_shard(config, ngrams, args.shard_dir, args.shard_index, args.num_shards, args.workers)
        state = "written" if done else "already done, skipped"
        print(f"shard {args.shard_index} of {args.num_shards}: {state} ({args.shard_dir})")
        return None
    if args.merge:
        return merge(config, args.shard_dir, args.num_shards, args.output, args.report)
    folder = tempfile.mkdtemp(prefix=".prepare_corpus.", dir=os.path.dirname(os.path.abspath(args.output)))
    try:
        run_shard(config, ngrams, folder, 0, 1, args.workers)
        return merge(config, folder, 1, args.output, args.report)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> None:
    args = get_args(argv)
    try:
        report = run(args)
    except CorpusError as error:
        raise SystemExit(f"error: {error}") from None
    except OSError as error:  # an unwritable output folder, a full disk: the message names the path
        raise SystemExit(f"error: {error}") from None
    if report is not None:
        print(summary(report))
        print(f"wrote {args.output} and {args.report}")


if __name__ == "__main__":
    main()
