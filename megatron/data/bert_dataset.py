"""BERT pretraining samples: two segments of sentences, sentence-order label, masked-LM targets.

The data is a `_sentence` indexed dataset: each sequence a sentence, documents delimited by
`document_indices`. The *samples mapping* (helpers.build_bert_samples_mapping, cached) cuts documents into
runs of sentences of about `max_seq_length - 3` tokens (shorter with probability `short_seq_prob`). Sample i
is then built with np.random.RandomState(seed + i), so it does not depend on the order samples are read:

1. Split the sentences at a random point into A and B (A = the first sentence when there are only two);
   with probability 1/2 swap them and set is_random = 1 (Megatron's next-sentence / sentence-order label).
2. Truncate to the target length: repeatedly drop a token from the longer segment (B on ties), from its
   front or back with equal probability.
3. `[CLS] A [SEP] B [SEP]`, token types 0 for [CLS] A [SEP] and 1 for B [SEP].
4. Mask up to n = min(ceil(p * target), max(1, round(p * len(tokens)))) tokens, p = masked_lm_prob, as
   Megatron does: whole words (a word piece that continues a word, WordPiece's "##", is masked with the
   piece before it) in n-grams of 1 to 3 words, n drawn with probability proportional to 1/n, the n-grams
   taken in random order, shortened when too long for the budget, skipped when they overlap one already
   taken. Each masked token becomes [MASK] (80%), stays (10%) or becomes a uniform random id (10%).
   Without the vocabulary's word pieces (`BertTokenIds.is_continuation` None) every token is a word.
5. Pad to max_seq_length with pad_id (token types with 0).

Without the binary head (`binary_head=False`, --bert-no-binary-head) all sentences form A: `[CLS] A [SEP]`,
is_random 0, and documents of one sentence are usable.

Difference from Megatron-LM: the random streams differ from Megatron's C++ helper and Python sampling, so
the samples are equally distributed but not identical.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from torch.utils.data import Dataset

from megatron.data.dataset_utils import build_train_valid_test, default_cache_dir
from megatron.data.helpers import build_bert_samples_mapping
from megatron.data.index_cache import array_digest, load_or_build
from megatron.data.indexed_dataset import IndexedDataset


@dataclass(frozen=True)
class BertTokenIds:
    """The tokenizer's special ids and vocabulary size (random replacements are drawn from [0, vocab_size)).

    is_continuation: optional bool array over the vocabulary, True for word pieces that continue a word
    (WordPiece's "##..."): whole-word masking keeps them with the word they belong to.
    """

    cls_id: int
    sep_id: int
    mask_id: int
    pad_id: int
    vocab_size: int
    is_continuation: Optional[np.ndarray] = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class BertMaskingConfig:
    """How samples are shaped: Megatron's --seq-length, --mask-prob, --short-seq-prob, binary head."""

    max_seq_length: int
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    binary_head: bool = True


def _split_segments(
    sentences: list[np.ndarray], rng: np.random.RandomState, binary_head: bool
) -> tuple[np.ndarray, np.ndarray, bool]:
    """(A, B, is_random): A = sentences[:a_end], B = the rest, swapped with probability 1/2."""
    if not binary_head:
        return np.concatenate(sentences), np.zeros(0, dtype=np.int64), False
    a_end = rng.randint(1, len(sentences)) if len(sentences) >= 3 else 1
    tokens_a, tokens_b = np.concatenate(sentences[:a_end]), np.concatenate(sentences[a_end:])
    if rng.random_sample() < 0.5:
        return tokens_b, tokens_a, True
    return tokens_a, tokens_b, False


def _truncate(
    tokens_a: np.ndarray, tokens_b: np.ndarray, max_num_tokens: int, rng: np.random.RandomState
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Drop tokens one at a time from the longer segment (B on ties), front or back at random."""
    a_lo, a_hi, b_lo, b_hi = 0, len(tokens_a), 0, len(tokens_b)
    excess = len(tokens_a) + len(tokens_b) - max_num_tokens
    if excess <= 0:
        return tokens_a, tokens_b, False
    from_front = rng.random_sample(excess) < 0.5
    for front in from_front:
        if a_hi - a_lo > b_hi - b_lo:
            a_lo, a_hi = (a_lo + 1, a_hi) if front else (a_lo, a_hi - 1)
        else:
            b_lo, b_hi = (b_lo + 1, b_hi) if front else (b_lo, b_hi - 1)
    return tokens_a[a_lo:a_hi], tokens_b[b_lo:b_hi], True


MAX_NGRAM_WORDS = 3  # Megatron's max_ngrams for BERT


def _words(
    tokens: np.ndarray, special: np.ndarray, is_continuation: Optional[np.ndarray]
) -> list[np.ndarray]:
    """The positions of each maskable word: non-special tokens, a continuation piece joined to the token
    before it (unless that one is special)."""
    candidates = np.flatnonzero(~special)
    if is_continuation is None or candidates.size == 0:
        return [candidates[i : i + 1] for i in range(candidates.size)]
    follows = np.zeros(candidates.size, dtype=bool)
    follows[1:] = is_continuation[tokens[candidates[1:]]] & (np.diff(candidates) == 1)
    return np.split(candidates, np.flatnonzero(~follows)[1:])


def _masked_positions(
    words: list[np.ndarray], num_tokens: int, budget: int, rng: np.random.RandomState
) -> np.ndarray:
    """Megatron's n-gram whole-word selection (module docstring, step 4): sorted positions, at most `budget`."""
    ngrams = np.arange(1, MAX_NGRAM_WORDS + 1)
    weights = 1.0 / ngrams
    covered = np.zeros(num_tokens, dtype=bool)
    chosen: list[np.ndarray] = []
    count = 0
    for start in rng.permutation(len(words)):
        if count >= budget:
            break
        longest = min(MAX_NGRAM_WORDS, len(words) - start)
        n = rng.choice(ngrams[:longest], p=weights[:longest] / weights[:longest].sum())
        span = np.concatenate(words[start : start + n])
        while count + span.size > budget and n > 1:
            n -= 1
            span = np.concatenate(words[start : start + n])
        if count + span.size > budget or covered[span].any():
            continue
        covered[span] = True
        chosen.append(span)
        count += span.size
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def build_training_sample(
    sentences: list[np.ndarray],
    target_length: int,
    token_ids: BertTokenIds,
    config: BertMaskingConfig,
    rng: np.random.RandomState,
) -> dict[str, np.ndarray]:
    """One BERT sample from consecutive sentences (see the module docstring for the five steps).

    Returns np.int64 arrays: text, types, labels (-1 where not masked, else the original id), loss_mask,
    padding_mask ([max_seq_length] each), and 0-d is_random, truncated.
    """
    sentences = [np.asarray(s, dtype=np.int64) for s in sentences]
    tokens_a, tokens_b, is_random = _split_segments(sentences, rng, config.binary_head)
    tokens_a, tokens_b, truncated = _truncate(tokens_a, tokens_b, target_length, rng)
    cls, sep = [token_ids.cls_id], [token_ids.sep_id]
    parts = [cls, tokens_a, sep] + ([tokens_b, sep] if config.binary_head else [])
    tokens = np.concatenate(parts).astype(np.int64)
    types = np.zeros(len(tokens), dtype=np.int64)
    types[len(tokens_a) + 2 :] = 1
    special = np.zeros(len(tokens), dtype=bool)
    special[[0, len(tokens_a) + 1, len(tokens) - 1]] = True
    p = config.masked_lm_prob
    budget = min(math.ceil(p * target_length), max(1, int(round(p * len(tokens)))))
    words = _words(tokens, special, token_ids.is_continuation)
    positions = _masked_positions(words, len(tokens), budget, rng)
    num_to_mask = positions.size
    labels = np.full(config.max_seq_length, -1, dtype=np.int64)
    labels[positions] = tokens[positions]
    action = rng.random_sample(num_to_mask)
    random_ids = rng.randint(0, token_ids.vocab_size, size=num_to_mask)
    masked = tokens.copy()
    masked[positions] = np.where(
        action < 0.8, token_ids.mask_id, np.where(action < 0.9, tokens[positions], random_ids)
    )
    num_pad = config.max_seq_length - len(tokens)
    if num_pad < 0:
        raise ValueError(
            f"a sample of {len(tokens)} tokens does not fit max_seq_length {config.max_seq_length}"
        )
    loss_mask = np.zeros(config.max_seq_length, dtype=np.int64)
    loss_mask[positions] = 1
    return {
        "text": np.concatenate((masked, np.full(num_pad, token_ids.pad_id, dtype=np.int64))),
        "types": np.concatenate((types, np.zeros(num_pad, dtype=np.int64))),
        "labels": labels,
        "is_random": np.array(int(is_random), dtype=np.int64),
        "loss_mask": loss_mask,
        "padding_mask": np.concatenate((np.ones(len(tokens), np.int64), np.zeros(num_pad, np.int64))),
        "truncated": np.array(int(truncated), dtype=np.int64),
    }


class BertDataset(Dataset):
    """BERT samples from the documents `documents` of a `_sentence` indexed dataset (see module docstring).

    len(dataset) >= num_samples: whole epochs over the documents are taken until there are enough.
    """

    def __init__(
        self,
        name: str,
        indexed_dataset: IndexedDataset,
        documents: np.ndarray,
        num_samples: int,
        seed: int,
        token_ids: BertTokenIds,
        config: BertMaskingConfig,
        cache_dir: Optional[str] = None,
    ) -> None:
        documents = np.asarray(documents, dtype=np.int64)
        if documents.size == 0:
            raise ValueError(
                f"BertDataset {name}: no documents in this split of {indexed_dataset.path_prefix}"
            )
        if config.max_seq_length < 5:
            raise ValueError(
                f"BertDataset {name}: max_seq_length {config.max_seq_length} leaves no room for text"
            )
        self.name = name
        self.indexed_dataset = indexed_dataset
        self.seed = seed
        self.token_ids = token_ids
        self.config = config
        description = {
            "class": "BertDataset",
            "path_prefix": os.path.abspath(indexed_dataset.path_prefix),
            "num_sequences": len(indexed_dataset),
            "documents_md5": array_digest(documents),
            "num_samples": num_samples,
            "max_seq_length": config.max_seq_length,
            "short_seq_prob": config.short_seq_prob,
            "binary_head": config.binary_head,
            "seed": seed,
        }
        bounds = indexed_dataset.document_indices

        def build() -> dict[str, np.ndarray]:
            try:
                mapping = build_bert_samples_mapping(
                    indexed_dataset.sequence_lengths,
                    bounds[documents],
                    bounds[documents + 1],
                    max_num_tokens=config.max_seq_length - 3,
                    short_seq_prob=config.short_seq_prob,
                    min_sentences=2 if config.binary_head else 1,
                    num_samples=num_samples,
                    seed=seed,
                )
            except ValueError as error:
                raise ValueError(f"BertDataset {name} of {indexed_dataset.path_prefix}: {error}") from None
            return {"samples_mapping": mapping}

        stem = f"{os.path.basename(indexed_dataset.path_prefix)}_{name}_bert"
        cache = default_cache_dir(indexed_dataset.path_prefix, cache_dir)
        self.samples_mapping = load_or_build(cache, stem, description, ["samples_mapping"], build)[
            "samples_mapping"
        ]

    def __len__(self) -> int:
        return int(self.samples_mapping.shape[0])

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        first, end, target = (int(v) for v in self.samples_mapping[idx])
        sentences = self.indexed_dataset[first:end]
        rng = np.random.RandomState((self.seed + int(idx)) % 2**32)
        return build_training_sample(sentences, target, self.token_ids, self.config, rng)


def build_train_valid_test_datasets(
    data_prefix: list[str],
    splits_string: str,
    train_valid_test_num_samples: tuple[int, int, int],
    seed: int,
    token_ids: BertTokenIds,
    config: BertMaskingConfig,
    cache_dir: Optional[str] = None,
) -> tuple[Optional[Dataset], Optional[Dataset], Optional[Dataset]]:
    """BERT (train, valid, test): documents split into contiguous ranges by `splits_string`, blended as GPT."""

    def make_dataset(name: str, indexed: IndexedDataset, documents: np.ndarray, num_samples: int) -> Dataset:
        return BertDataset(name, indexed, documents, num_samples, seed, token_ids, config, cache_dir)

    return build_train_valid_test(
        data_prefix, splits_string, train_valid_test_num_samples, lambda d: d.num_documents, make_dataset
    )
