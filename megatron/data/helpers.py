"""Index building for the datasets, in numpy (Megatron-LM does this in a compiled `helpers.cpp`).

GPT (`build_gpt_indices`): the documents of a split are repeated for as many epochs as the requested samples
need and shuffled (the *document index*); their tokens, read in that order, form one long stream. Sample i
is the `seq_length + 1` tokens starting at stream position `i * seq_length` (consecutive samples share one
token: the last input token of one is the first of the next). The *sample index* stores, for every
boundary position `k * seq_length`, the (document-index position, offset in that document) where it falls;
the *shuffle index* permutes the samples. Everything is a prefix sum and a binary search over that stream.

BERT (`build_bert_samples_mapping`): each document (a run of sentences) is cut greedily into chunks whose
token count first reaches a target length; vectorised over documents, looping over chunk number.

Blending: see megatron/data/blending.py.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

LONG_SENTENCE_LEN = 512  # Megatron skips (multi-sentence) BERT documents with a sentence longer than this
SEPARATE_LAST_EPOCH_THRESHOLD = 0.80  # Megatron's rule, see gpt_separate_last_epoch


def gpt_num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    """Fewest epochs E with (E * tokens_per_epoch - 1) // seq_length >= num_samples (at least 1).

    Sample k needs stream tokens up to position (k + 1) * seq_length, so N samples need N * seq_length + 1.
    """
    if tokens_per_epoch <= 0:
        raise ValueError("the documents of this split hold no tokens")
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))  # integer ceil


def gpt_separate_last_epoch(
    num_epochs: int, tokens_per_epoch: int, seq_length: int, num_samples: int
) -> bool:
    """Megatron's rule: shuffle the last epoch apart when less than 80% of it is used.

    Otherwise the few samples taken from the last epoch would be drawn from a shuffle over all epochs,
    over-representing some documents in the requested samples.
    """
    if num_epochs == 1:
        return False
    samples_before_last = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    samples_per_epoch = (tokens_per_epoch - 1) // seq_length
    return num_samples - samples_before_last < int(SEPARATE_LAST_EPOCH_THRESHOLD * samples_per_epoch)


def build_document_index(
    documents: np.ndarray, num_epochs: int, rng: np.random.RandomState, separate_last_epoch: bool
) -> np.ndarray:
    """`documents` repeated `num_epochs` times, shuffled (the last epoch on its own when separated). int32."""
    if separate_last_epoch and num_epochs > 1:
        first = build_document_index(documents, num_epochs - 1, rng, False)
        last = build_document_index(documents, 1, rng, False)
        return np.concatenate((first, last))
    document_index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
    rng.shuffle(document_index)
    return document_index


def build_sample_index(
    sequence_lengths: np.ndarray, document_index: np.ndarray, seq_length: int, num_samples: int
) -> np.ndarray:
    """[num_samples + 1, 2] array of (document-index position, token offset) of stream positions k*seq_length.

    Row 0 is (0, 0); row k > 0 locates the token at stream position p = k * seq_length: the position j of
    the document with start_j <= p < end_j in the document index, and p - start_j. Sample k spans rows k and
    k + 1 inclusive. Empty documents are never pointed at (as in Megatron's helper).
    """
    lengths = sequence_lengths[document_index].astype(np.int64)
    ends = np.cumsum(lengths)
    if num_samples * seq_length >= (ends[-1] if ends.size else 0):
        raise ValueError(
            f"{num_samples} samples of {seq_length} tokens need more tokens than the documents hold"
        )
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    doc_positions = np.searchsorted(ends, positions, side="right")
    offsets = positions - (ends[doc_positions] - lengths[doc_positions])
    doc_positions[0], offsets[0] = 0, 0
    fits_int32 = max(len(document_index), int(sequence_lengths.max(initial=0))) < np.iinfo(np.int32).max
    dtype = np.int32 if fits_int32 else np.int64
    return np.stack((doc_positions, offsets), axis=1).astype(dtype)


def build_shuffle_index(num_shuffled: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """Permutation of range(total): [0, num_shuffled) shuffled, then [num_shuffled, total) shuffled apart."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_shuffled, dtype=dtype)
    rng.shuffle(first)
    if num_shuffled == total:
        return first
    last = np.arange(num_shuffled, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_gpt_indices(
    sequence_lengths: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int, seed: int
) -> dict[str, np.ndarray]:
    """Document, sample and shuffle indices of a GPT dataset, as Megatron-LM builds them.

    `sequence_lengths[d]` is the token count of document d; `documents` the ids in this split. Enough whole
    epochs are taken for `num_samples`; the dataset then has every sample of those epochs,
    (epochs * tokens_per_epoch - 1) // seq_length of them (>= num_samples). One np.random.RandomState(seed)
    shuffles the document index, then the shuffle index, in Megatron's order, so the same seed gives the
    same indices as Megatron-LM.
    """
    documents = np.asarray(documents)
    tokens_per_epoch = int(sequence_lengths[documents].astype(np.int64).sum())
    num_epochs = gpt_num_epochs(tokens_per_epoch, seq_length, num_samples)
    separate = gpt_separate_last_epoch(num_epochs, tokens_per_epoch, seq_length, num_samples)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(documents, num_epochs, rng, separate)
    total_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_index = build_sample_index(sequence_lengths, document_index, seq_length, total_samples)
    num_shuffled = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length if separate else total_samples
    shuffle_index = build_shuffle_index(num_shuffled, total_samples, rng)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


def _draw_target_lengths(
    rng: np.random.RandomState, n: int, max_num_tokens: int, short_seq_prob: float
) -> np.ndarray:
    """max_num_tokens, or with probability short_seq_prob a length uniform in [2, max_num_tokens]."""
    short = rng.random_sample(n) < short_seq_prob
    lengths = rng.randint(2, max_num_tokens + 1, size=n)
    return np.where(short, lengths, max_num_tokens)


def build_bert_samples_mapping(
    sentence_lengths: np.ndarray,
    document_starts: np.ndarray,
    document_ends: np.ndarray,
    max_num_tokens: int,
    short_seq_prob: float,
    min_sentences: int,
    num_samples: Optional[int],
    seed: int,
) -> np.ndarray:
    """[N, 3] int64 rows (first sentence, end sentence (exclusive), target length), shuffled.

    Document d holds sentences [document_starts[d], document_ends[d]). Documents with fewer than
    `min_sentences` sentences, or with several sentences one of which is longer than 512 tokens, are
    skipped (Megatron's rule). A document is cut greedily: a chunk ends at the first sentence where its
    token count reaches the target length, it has at least `min_sentences` sentences and more than one
    sentence is left in the document; otherwise it runs to the document's end. Each chunk draws its target
    (see _draw_target_lengths). Epochs (new targets each) are added until there are at least `num_samples`
    rows (one epoch when None); rows are then shuffled with RandomState(seed + 1).
    """
    starts = np.asarray(document_starts, dtype=np.int64)
    ends = np.asarray(document_ends, dtype=np.int64)
    cumulative = np.zeros(len(sentence_lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(sentence_lengths).astype(np.int64), out=cumulative[1:])  # cumsum(dtype=) is slow
    long_sentences = np.flatnonzero(np.asarray(sentence_lengths) > LONG_SENTENCE_LEN)
    counts = ends - starts
    has_long = np.searchsorted(long_sentences, ends) > np.searchsorted(long_sentences, starts)
    keep = (counts >= min_sentences) & ~((counts > 1) & has_long)
    starts, ends = starts[keep], ends[keep]
    if starts.size == 0:
        raise ValueError(
            f"no document has at least {min_sentences} sentences (and no sentence over {LONG_SENTENCE_LEN} tokens)"
        )
    rng = np.random.RandomState(seed)
    epochs = []
    total = 0
    while True:
        epoch = _bert_epoch(cumulative, starts, ends, max_num_tokens, short_seq_prob, min_sentences, rng)
        epochs.append(epoch)
        total += len(epoch)
        if num_samples is None or total >= num_samples:
            break
    mapping = np.concatenate(epochs)
    return mapping[np.random.RandomState(seed + 1).permutation(len(mapping))]


def _bert_epoch(
    cumulative: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    max_num_tokens: int,
    short_seq_prob: float,
    min_sentences: int,
    rng: np.random.RandomState,
) -> np.ndarray:
    """One pass of greedy chunking over all documents; iteration c cuts the c-th chunk of every document.

    For a chunk starting at sentence s with target T, the first sentence t where tokens(s..t) >= T is
    searchsorted(cumulative, cumulative[s] + T) - 1; the cut is at max(t, s + min_sentences - 1) if more
    than one sentence remains after it, else at the document's end.
    """
    chunk_start = starts.copy()
    active = np.arange(starts.size)
    rows = []
    while active.size:
        first, end = chunk_start[active], ends[active]
        target = _draw_target_lengths(rng, active.size, max_num_tokens, short_seq_prob)
        last = np.searchsorted(cumulative, cumulative[first] + target, side="left") - 1
        last = np.maximum(last, first + min_sentences - 1)
        early = last < end - 2
        stop = np.where(early, last + 1, end)
        rows.append(np.stack((first, stop, target), axis=1))
        chunk_start[active] = stop
        active = active[early]
    return np.concatenate(rows).astype(np.int64)
