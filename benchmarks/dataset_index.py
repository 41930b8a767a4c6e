"""Time the dataset index builders on synthetic sizes (no .bin needed: the builders read lengths only).

    python benchmarks/dataset_index.py                      # 2M documents of ~500 tokens = 1B tokens
    python benchmarks/dataset_index.py --num-docs 200000    # smaller
    python benchmarks/dataset_index.py --only-blend         # the blending index alone (5e8 samples, ~5 GB)

Prints the seconds taken to build the GPT document/sample/shuffle indices for one epoch of the corpus,
the blending index of --blend-samples samples from four datasets (microseconds per sample, beside the
plain sequential loop timed on --blend-loop-samples before and after it, so that a loaded machine shows
as a change in both), and a BERT samples mapping of the same corpus cut into sentences of ~25 tokens.
Megatron-LM's C++ helper cannot be built here; issue 8 measured it at 0.018 us per sample (4 datasets,
200,000 samples, side by side with the Python loop at 0.47 us).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from megatron.data.blending import blend_sequential, build_blending_indices
from megatron.data.helpers import build_bert_samples_mapping, build_gpt_indices

BLEND_WEIGHTS = np.array([0.4, 0.3, 0.2, 0.1])


def _time_blending(samples: int, loop_samples: int) -> None:
    """us per sample of the vectorised blend and of the sequential loop (before and after it)."""
    chosen, positions = np.empty(loop_samples, np.int16), np.empty(loop_samples, np.int64)
    loop = []
    for when in ("before", "after"):
        if when == "after":
            start = time.perf_counter()
            build_blending_indices(BLEND_WEIGHTS, samples)
            fast = (time.perf_counter() - start) / samples * 1e6
        start = time.perf_counter()
        blend_sequential(BLEND_WEIGHTS, [0] * 4, 0, loop_samples, chosen, positions)
        loop.append((time.perf_counter() - start) / loop_samples * 1e6)
    start = time.perf_counter()  # the floor any implementation pays at this size: writing its two outputs
    np.empty(samples, np.int16).fill(0)
    np.empty(samples, np.int64).fill(0)
    floor = (time.perf_counter() - start) / samples * 1e6
    print(
        f"blending indices, 4 datasets: vectorised {fast:.4f} us/sample over {samples:,} samples "
        f"(of which at least {floor:.4f} us/sample is writing fresh output memory once) "
        f"({fast * samples / 1e6:.1f} s); sequential loop {loop[0]:.3f} / {loop[1]:.3f} us/sample "
        f"(before / after, {loop_samples:,} samples): {min(loop) / fast:.1f}x to {max(loop) / fast:.1f}x "
        f"faster (Megatron's C++ helper: 0.018 us/sample, 26x the loop, as measured in issue 8)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-docs", type=int, default=2_000_000)
    parser.add_argument("--mean-doc-length", type=int, default=500)
    parser.add_argument("--seq-length", type=int, default=2048)
    parser.add_argument("--blend-samples", type=int, default=500_000_000)
    parser.add_argument("--blend-loop-samples", type=int, default=1_000_000)
    parser.add_argument("--only-blend", action="store_true")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    _time_blending(args.blend_samples, args.blend_loop_samples)
    if args.only_blend:
        return

    rng = np.random.RandomState(0)
    sizes = rng.randint(1, 2 * args.mean_doc_length, size=args.num_docs).astype(np.int32)
    total = int(sizes.sum(dtype=np.int64))
    num_samples = (total - 1) // args.seq_length
    print(f"corpus: {args.num_docs:,} documents, {total:,} tokens; seq_length {args.seq_length}")

    start = time.perf_counter()
    indices = build_gpt_indices(sizes, np.arange(args.num_docs), num_samples, args.seq_length, args.seed)
    elapsed = time.perf_counter() - start
    print(f"GPT indices, {len(indices['sample_index']) - 1:,} samples (one epoch): {elapsed:.2f} s")

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
