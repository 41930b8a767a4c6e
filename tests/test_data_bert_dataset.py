"""BERT samples: structure, segment order vs label, masking rates, samples mapping, cache, splits."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megatron.data import bert_dataset, helpers
from megatron.data.bert_dataset import (
    BertDataset,
    BertMaskingConfig,
    BertTokenIds,
    build_train_valid_test_datasets,
)
from megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.data.mock_dataset import MockBertDataset

IDS = BertTokenIds(cls_id=101, sep_id=102, mask_id=103, pad_id=0, vocab_size=30522)
FIRST_WORD = 1000  # token id = FIRST_WORD + position in the corpus, so every token is unique and ordered


def write_sentence_dataset(prefix: str, seed: int, num_docs: int, max_sentence: int = 20) -> list[list[int]]:
    """Documents of 1-8 sentences of 1..max_sentence tokens; returns the sentence lengths per document."""
    rng = np.random.RandomState(seed)
    documents = [rng.randint(1, max_sentence + 1, size=rng.randint(1, 9)).tolist() for _ in range(num_docs)]
    position = FIRST_WORD
    with IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16) as builder:
        for lengths in documents:
            total = sum(lengths)
            builder.add_document(np.arange(position, position + total), lengths)
            position += total
        builder.finalize(prefix + ".idx")
    assert position < IDS.vocab_size
    return documents


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("bert") / "corpus_text_sentence")
    write_sentence_dataset(prefix, seed=0, num_docs=400)
    return prefix


@pytest.fixture(scope="module")
def samples(corpus):
    config = BertMaskingConfig(max_seq_length=64)
    dataset = BertDataset("train", IndexedDataset(corpus), np.arange(400), 3000, 1, IDS, config)
    return [dataset[i] for i in range(len(dataset))]


def unmasked(sample: dict) -> np.ndarray:
    return np.where(sample["labels"] >= 0, sample["labels"], sample["text"])


def test_structure_and_segment_order(samples):
    assert len(samples) >= 3000
    for s in samples:
        assert all(v.dtype == np.int64 for v in s.values())
        assert all(s[k].shape == (64,) for k in ("text", "types", "labels", "loss_mask", "padding_mask"))
        n = int(s["padding_mask"].sum())
        np.testing.assert_array_equal(s["padding_mask"], np.arange(64) < n)
        assert (s["text"][n:] == IDS.pad_id).all() and (s["types"][n:] == 0).all()
        tokens = unmasked(s)[:n]
        seps = np.flatnonzero(tokens == IDS.sep_id)
        assert tokens[0] == IDS.cls_id and len(seps) == 2 and seps[1] == n - 1
        np.testing.assert_array_equal(s["types"][:n], np.arange(n) > seps[0])
        a, b = tokens[1 : seps[0]], tokens[seps[0] + 1 : n - 1]
        assert a.size and b.size and (a >= FIRST_WORD).all() and (b >= FIRST_WORD).all()
        assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all()  # each segment is a contiguous run
        if s["is_random"]:
            assert b[-1] < a[0]  # swapped: B precedes A in the document
        else:
            assert a[-1] < b[0]
            if not s["truncated"]:
                assert b[0] == a[-1] + 1  # untruncated, in order: B continues A
        assert (s["labels"] >= 0).sum() == s["loss_mask"].sum()
        np.testing.assert_array_equal(s["labels"] >= 0, s["loss_mask"] == 1)
        assert (s["labels"][s["loss_mask"] == 1] >= FIRST_WORD).all()  # specials and padding never masked


def test_rates(samples):
    masked = sum(int(s["loss_mask"].sum()) for s in samples)
    tokens = sum(int(s["padding_mask"].sum()) for s in samples)
    assert abs(masked / tokens - 0.15) < 0.01
    text = np.concatenate([s["text"][s["loss_mask"] == 1] for s in samples])
    labels = np.concatenate([s["labels"][s["loss_mask"] == 1] for s in samples])
    to_mask = np.mean(text == IDS.mask_id)
    kept = np.mean(text == labels)
    replaced = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(replaced - 0.1) < 0.01
    assert abs(np.mean([int(s["is_random"]) for s in samples]) - 0.5) < 0.04


def test_samples_are_deterministic(corpus):
    config = BertMaskingConfig(max_seq_length=64)
    a = BertDataset("train", IndexedDataset(corpus), np.arange(400), 100, 1, IDS, config)
    b = BertDataset("train", IndexedDataset(corpus), np.arange(400), 100, 1, IDS, config)
    for i in (0, 7, 99):
        for key in a[i]:
            np.testing.assert_array_equal(a[i][key], b[i][key])
    assert not np.array_equal(a[0]["text"], a[1]["text"])


def check_mapping_rule(mapping, lengths, starts, ends, max_tokens, min_sentences):
    cumulative = np.concatenate(([0], np.cumsum(lengths)))
    doc_of = {}
    for d, (s, e) in enumerate(zip(starts, ends)):
        for i in range(s, e):
            doc_of[i] = d
    for first, stop, target in mapping:
        d = doc_of[first]
        assert doc_of[stop - 1] == d and 2 <= target <= max_tokens
        end = ends[d]
        cut_points = [
            t
            for t in range(first + min_sentences - 1, end - 2)
            if cumulative[t + 1] - cumulative[first] >= target
        ]
        assert stop - 1 == (cut_points[0] if cut_points else end - 1)


@pytest.mark.parametrize("min_sentences", [1, 2])
def test_samples_mapping_follows_the_greedy_rule(min_sentences):
    rng = np.random.RandomState(3)
    counts = rng.randint(0, 12, size=60)
    lengths = rng.randint(0, 30, size=counts.sum())
    lengths[5] = 600  # a long sentence: its document is skipped unless it is alone in it
    bounds = np.concatenate(([0], np.cumsum(counts)))
    mapping = helpers.build_bert_samples_mapping(
        lengths, bounds[:-1], bounds[1:], 40, 0.3, min_sentences, None, 9
    )
    kept = [
        d
        for d in range(60)
        if counts[d] >= min_sentences
        and not (counts[d] > 1 and (lengths[bounds[d] : bounds[d + 1]] > 512).any())
    ]
    # One epoch: the chunks partition exactly the sentences of the kept documents.
    covered = np.sort(np.concatenate([np.arange(a, b) for a, b, _ in mapping]))
    np.testing.assert_array_equal(
        covered, np.concatenate([np.arange(bounds[d], bounds[d + 1]) for d in kept])
    )
    check_mapping_rule(mapping, lengths, bounds[:-1], bounds[1:], 40, min_sentences)
    short = np.mean(mapping[:, 2] < 40)
    assert 0.15 < short < 0.45  # about 0.3 (a short draw can also equal the maximum)


def test_mapping_epochs_and_short_seq_prob():
    counts = np.full(500, 6)
    lengths = np.full(3000, 10)
    bounds = np.concatenate(([0], np.cumsum(counts)))
    mapping = helpers.build_bert_samples_mapping(lengths, bounds[:-1], bounds[1:], 125, 0.1, 2, 5000, 0)
    assert len(mapping) >= 5000
    per_epoch = len(
        helpers.build_bert_samples_mapping(lengths, bounds[:-1], bounds[1:], 125, 0.1, 2, None, 0)
    )
    assert len(mapping) < 5000 + 2 * per_epoch
    targets = mapping[:, 2]
    assert abs(np.mean(targets < 125) - 0.1 * 123 / 124) < 0.015


def test_cache_reused_and_split_by_documents(corpus, tmp_path, monkeypatch):
    config = BertMaskingConfig(max_seq_length=32, binary_head=True)
    cache = str(tmp_path / "cache")
    train, valid, test = build_train_valid_test_datasets(
        [corpus], "8,2,0", (200, 50, 0), 5, IDS, config, cache
    )
    assert test is None and len(train) >= 200 and len(valid) >= 50
    indexed = IndexedDataset(corpus)
    boundary_sentence = indexed.document_indices[320]  # 400 documents, 80% for training
    assert train.samples_mapping[:, 1].max() <= boundary_sentence
    assert valid.samples_mapping[:, 0].min() >= boundary_sentence
    files = sorted(os.listdir(cache))
    mtimes = [os.path.getmtime(os.path.join(cache, f)) for f in files]

    def fail(*args, **kwargs):
        raise AssertionError("samples mapping rebuilt although cached")

    monkeypatch.setattr(bert_dataset, "build_bert_samples_mapping", fail)
    again, _, _ = build_train_valid_test_datasets([corpus], "8,2,0", (200, 50, 0), 5, IDS, config, cache)
    np.testing.assert_array_equal(again.samples_mapping, train.samples_mapping)
    assert [os.path.getmtime(os.path.join(cache, f)) for f in files] == mtimes


def test_no_binary_head(corpus):
    config = BertMaskingConfig(max_seq_length=48, binary_head=False)
    dataset = BertDataset("train", IndexedDataset(corpus), np.arange(100), 200, 2, IDS, config)
    for i in range(len(dataset)):
        s = dataset[i]
        n = int(s["padding_mask"].sum())
        tokens = unmasked(s)[:n]
        assert tokens[0] == IDS.cls_id and tokens[-1] == IDS.sep_id and (tokens[1:-1] >= FIRST_WORD).all()
        assert s["is_random"] == 0 and (s["types"] == 0).all()


def test_mock_bert_dataset_format():
    dataset = MockBertDataset(50, seed=3, token_ids=IDS, config=BertMaskingConfig(max_seq_length=40))
    first = dataset[0]
    assert set(first) == {"text", "types", "labels", "is_random", "loss_mask", "padding_mask", "truncated"}
    assert first["text"].shape == (40,) and first["text"][0] == IDS.cls_id
    np.testing.assert_array_equal(dataset[7]["text"], dataset[7]["text"])
    with pytest.raises(IndexError):
        dataset[50]


def test_no_usable_document_is_reported(tmp_path):
    prefix = str(tmp_path / "single_sentences")
    with IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16) as builder:
        for i in range(5):
            builder.add_document([FIRST_WORD + i] * 3, [3])
        builder.finalize(prefix + ".idx")
    with pytest.raises(ValueError, match="single_sentences.*at least 2 sentences"):
        BertDataset("train", IndexedDataset(prefix), np.arange(5), 10, 0, IDS, BertMaskingConfig(16))


def test_whole_word_ngram_masking():
    """Word pieces that continue a word are masked together with it; spans of up to 3 words occur."""
    is_continuation = np.zeros(IDS.vocab_size, dtype=bool)
    is_continuation[5000:6000] = True  # ids 5000-5999 play WordPiece's "##" pieces
    ids = BertTokenIds(101, 102, 103, 0, IDS.vocab_size, is_continuation=is_continuation)
    config = BertMaskingConfig(max_seq_length=128)
    rng = np.random.RandomState(0)
    masked_fraction, span_words, whole = [], [], True
    for i in range(400):
        words = [
            np.concatenate(([rng.randint(1000, 5000)], rng.randint(5000, 6000, size=rng.randint(0, 3))))
            for _ in range(rng.randint(20, 40))
        ]
        sentences = [np.concatenate(words[: len(words) // 2]), np.concatenate(words[len(words) // 2 :])]
        sample = bert_dataset.build_training_sample(sentences, 125, ids, config, np.random.RandomState(i))
        text = unmasked(sample)
        real = sample["padding_mask"] == 1
        mask = sample["loss_mask"] == 1
        masked_fraction.append(mask.sum() / real.sum())
        starts = real & ~is_continuation[text]  # word starts (and special tokens)
        for pos in np.flatnonzero(mask):
            if is_continuation[text[pos]]:
                whole &= bool(mask[pos - 1])  # a masked piece's predecessor in its word is masked too
            else:
                end = pos + 1
                while end < len(text) and real[end] and not starts[end]:
                    whole &= bool(mask[end])  # a masked word start takes its pieces with it
                    end += 1
        # Lengths of masked runs, in words.
        run = 0
        for pos in range(len(text)):
            if mask[pos] and starts[pos]:
                run += 1
            elif not mask[pos]:
                if run:
                    span_words.append(run)
                run = 0
    assert whole
    assert abs(np.mean(masked_fraction) - 0.15) < 0.02
    assert max(span_words) >= 3 and np.mean(np.array(span_words) > 1) > 0.2


def test_mask_budget_is_never_exceeded():
    ids = BertTokenIds(101, 102, 103, 0, IDS.vocab_size, is_continuation=np.zeros(IDS.vocab_size, dtype=bool))
    config = BertMaskingConfig(max_seq_length=32)
    sentences = [np.arange(1000, 1010), np.arange(1010, 1027)]
    for seed in range(200):
        sample = bert_dataset.build_training_sample(sentences, 29, ids, config, np.random.RandomState(seed))
        assert sample["loss_mask"].sum() <= round(0.15 * 30)
