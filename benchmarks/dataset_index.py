"""Time the dataset index builders on synthetic sizes (no .bin needed: the builders read lengths only).

    python benchmarks/dataset_index.py                      # 2M documents of ~500 tokens = 1B tokens
    python benchmarks/dataset_index.py --num-docs 200000    # smaller

Prints the seconds taken to build the GPT document/sample/shuffle indices for one epoch of the corpus,
to blend 10^6 samples from three datasets, and to build a BERT samples mapping of the same corpus cut into
sentences of ~25 tokens.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from megatron.data.helpers import build_bert_samples_mapping, build_blending_indices, build_gpt_indices


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-docs", type=int, default=2_000_000)
    parser.add_argument("--mean-doc-length", type=int, default=500)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--blend-samples", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    rng = np.random.RandomState(0)
    sizes = rng.randint(1, 2 * args.mean_doc_length, size=args.num_docs).astype(np.int32)
    total = int(sizes.sum(dtype=np.int64))
    num_samples = (total - 1) // args.seq_length
    print(f"corpus: {args.num_docs:,} documents, {total:,} tokens; seq_length {args.seq_length}")

    start = time.perf_counter()
    indices = build_gpt_indices(sizes, np.arange(args.num_docs), num_samples, args.seq_length, args.seed)
    elapsed = time.perf_counter() - start
    print(f"GPT indices, {len(indices['sample_index']) - 1:,} samples (one epoch): {elapsed:.2f} s")

    start = time.perf_counter()
    build_blending_indices(np.array([0.5, 0.3, 0.2]), args.blend_samples)
    print(
        f"blending indices, {args.blend_samples:,} samples from 3 datasets: {time.perf_counter() - start:.2f} s"
    )

    sentence_lengths = rng.randint(1, 50, size=total // 25).astype(np.int32)
    counts = np.bincount(rng.randint(0, args.num_docs, size=sentence_lengths.size), minlength=args.num_docs)
    bounds = np.concatenate(([0], np.cumsum(counts)))
    start = time.perf_counter()
    mapping = build_bert_samples_mapping(
        sentence_lengths, bounds[:-1], bounds[1:], 509, 0.1, 2, None, args.seed
    )
    elapsed = time.perf_counter() - start
    print(
        f"BERT samples mapping, {sentence_lengths.size:,} sentences -> {len(mapping):,} samples: {elapsed:.2f} s"
    )


if __name__ == "__main__":
    main()
