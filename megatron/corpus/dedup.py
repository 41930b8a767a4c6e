"""Exact and fuzzy (MinHash LSH) duplicate detection.

Per document (in the workers): `normalise` the text (lower-cased `\\w+` words joined by single spaces);
the exact key is a 64-bit BLAKE2b hash of it; the MinHash signature (rensa's RMinHash, `num_perm` 32-bit
values) is taken over its word `ngram`-grams (the whole text if it has fewer words).

Across all documents (in the merge), with documents indexed in input order:
- exact: documents with equal keys form a cluster;
- fuzzy, for the documents left: the signature is cut into `bands` bands of `rows` values; documents with
  an equal band are candidates (P(candidate) = 1 - (1 - J^rows)^bands for Jaccard similarity J); a
  candidate pair is confirmed when the fraction of equal signature values (an unbiased estimate of J) is
  at least `threshold`. Confirmed pairs are joined (union-find) into clusters.
Each cluster keeps its first document in input order, so the result does not depend on sharding.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron.corpus.io import require

WORD = re.compile(r"\w+")
PAIRWISE_LIMIT = 64  # larger LSH buckets are verified against their first member only


@dataclass(frozen=True)
class MinHashConfig:
    ngram: int = 2
    num_perm: int = 128
    bands: int = 32
    rows: int = 4
    threshold: float = 0.5
    seed: int = 1


def normalise(text: str) -> list[str]:
    return WORD.findall(text.lower())


def exact_key(words: list[str]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(words).encode("utf-8"), digest_size=8).digest(), "little")


class Signer:
    """MinHash signatures of documents (uint32 array of `num_perm` values)."""

    def __init__(self, config: MinHashConfig) -> None:
        self._rensa = require("rensa", "rensa")
        self.config = config

    def __call__(self, words: list[str]) -> np.ndarray:
        n = self.config.ngram
        shingles = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)] or [" ".join(words)]
        minhash = self._rensa.RMinHash(num_perm=self.config.num_perm, seed=self.config.seed)
        minhash.update(shingles)
        return np.asarray(minhash.digest(), dtype=np.uint32)


class UnionFind:
    """Clusters over 0..n-1 whose root is always the smallest member (the first in input order)."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, i: int, j: int) -> None:
        a, b = self.find(i), self.find(j)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


def equal_runs(keys: np.ndarray) -> list[np.ndarray]:
    """Groups (each sorted, of size >= 2) of indices whose keys are equal."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    boundaries = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    return [np.sort(run) for run in np.split(order, boundaries) if len(run) > 1]


def exact_clusters(keys: np.ndarray) -> np.ndarray:
    """For each document, the index of the first document with the same exact key."""
    roots = np.arange(len(keys), dtype=np.int64)
    for run in equal_runs(keys):
        roots[run] = run[0]
    return roots


def band_keys(signatures: np.ndarray, band: int, rows: int) -> np.ndarray:
    """One uint64 per document for band `band` (a polynomial hash of its `rows` values)."""
    block = signatures[:, band * rows : (band + 1) * rows].astype(np.uint64)
    key = np.zeros(len(signatures), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for column in range(rows):
            key = key * np.uint64(0x9E3779B97F4A7C15) + block[:, column] + np.uint64(1)
    return key


def fuzzy_clusters(signatures: np.ndarray, candidates: Sequence[int], config: MinHashConfig) -> np.ndarray:
    """For each document, the first document of its fuzzy cluster; only `candidates` (indices into
    `signatures`, increasing) take part, every other document is its own cluster."""
    candidates = np.asarray(candidates, dtype=np.int64)
    forest = UnionFind(len(signatures))
    subset = signatures[candidates]
    for band in range(config.bands):
        for run in equal_runs(band_keys(subset, band, config.rows)):
            members = subset[run]
            if len(run) <= PAIRWISE_LIMIT:
                similar = (members[:, None, :] == members[None, :, :]).mean(axis=2) >= config.threshold
            else:
                similar = np.zeros((len(run), len(run)), dtype=bool)
                similar[0] = (members == members[0]).mean(axis=1) >= config.threshold
            for a, b in zip(*np.nonzero(np.triu(similar, k=1))):
                forest.union(int(candidates[run[a]]), int(candidates[run[b]]))
    return forest.roots()
