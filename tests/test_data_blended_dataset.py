"""Megatron's greedy blending rule, weights met, and BlendedDataset's lookups and checks."""

from __future__ import annotations

import numpy as np
import pytest

from megatron.data import blending
from megatron.data.blended_dataset import BlendedDataset
from megatron.data.blending import blend_sequential, build_blending_indices
from megatron.data.dataset_utils import blended_num_samples
from megatron.data.mock_dataset import MockGPTDataset


def reference_blend(weights, size):
    """The rule as stated, with numpy: argmax_k (w_k * max(i, 1) - c_k), first k on ties."""
    counts = np.zeros(len(weights), dtype=np.int64)
    chosen, positions = [], []
    for i in range(size):
        k = int(np.argmax(np.asarray(weights) * max(i, 1) - counts))
        chosen.append(k)
        positions.append(counts[k])
        counts[k] += 1
    return np.array(chosen), np.array(positions)


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.2, 0.3, 0.5], [0.7, 0.0, 0.1, 0.2], [1.0]])
def test_matches_the_rule(weights):
    chosen, positions = build_blending_indices(np.array(weights), 2000)
    want_chosen, want_positions = reference_blend(weights, 2000)
    np.testing.assert_array_equal(chosen, want_chosen)
    np.testing.assert_array_equal(positions, want_positions)


def _sequential(weights, size):
    chosen, positions = np.empty(size, np.int16), np.empty(size, np.int64)
    blend_sequential(np.asarray(weights, dtype=np.float64), [0] * len(weights), 0, size, chosen, positions)
    return chosen, positions


def _weight_sets(rng):
    """Random weights of 1..8 datasets, some skewed, some with zeros, some rational with many ties."""
    for trial in range(36):
        k = 1 + trial % 8
        w = rng.rand(k) ** (1 + trial % 3)
        if trial % 4 == 1:
            w[rng.randint(k)] = 0.0 if k > 1 else w[0]
        if trial % 4 == 2:
            w = rng.randint(1, 5, size=k).astype(np.float64)
        yield w / w.sum()


def test_vectorised_blend_equals_the_loop_on_many_weight_sets(monkeypatch):
    """Exactly the sequential rule (Megatron's helper), with the default blocks and with tiny blocks and
    no warm-up, which start from wrong guesses and so go through the repair path."""
    repairs = []
    real_repair = blending._repair
    monkeypatch.setattr(blending, "_repair", lambda *a: repairs.append(1) or real_repair(*a))
    rng = np.random.RandomState(0)
    for weights in _weight_sets(rng):
        size = int(rng.randint(1, 12_000))
        expected = _sequential(weights, size)
        for block, warmup in ((None, blending.WARMUP), (int(rng.randint(2, 400)), int(rng.randint(0, 3)))):
            chosen, positions = build_blending_indices(weights, size, block=block, warmup=warmup)
            np.testing.assert_array_equal(chosen, expected[0], err_msg=f"{weights} {size} {block}")
            np.testing.assert_array_equal(positions, expected[1], err_msg=f"{weights} {size} {block}")
            assert chosen.dtype == np.int16 and positions.dtype == np.int64
    assert len(repairs) > 10  # the repair path was exercised
    big = np.array([0.4, 0.3, 0.2, 0.1])  # several default-size blocks side by side
    np.testing.assert_array_equal(
        build_blending_indices(big, 40_000, block=4096)[0], _sequential(big, 40_000)[0]
    )


def test_weights_met_at_every_prefix():
    rng = np.random.RandomState(0)
    weights = rng.rand(5)
    weights /= weights.sum()
    chosen, positions = build_blending_indices(weights, 100_000)
    counts = np.stack([np.cumsum(chosen == k) for k in range(5)], axis=1)
    n = np.arange(1, 100_001)[:, None]
    assert np.abs(counts - weights * n).max() <= 1.0 + 1e-9  # within one sample of the share, always
    assert np.allclose(counts[-1] / 100_000, weights, atol=0.01 * weights.max())
    for k in range(5):  # each dataset's samples are taken in order 0, 1, 2, ...
        np.testing.assert_array_equal(positions[chosen == k], np.arange(counts[-1, k]))


def test_blended_dataset_reads_the_right_samples():
    a = MockGPTDataset(400, seq_length=4, vocab_size=100, seed=0)
    b = MockGPTDataset(700, seq_length=4, vocab_size=100, seed=10_000)
    blend = BlendedDataset([a, b], [2.0, 6.0], size=800)
    assert len(blend) == 800 and np.allclose(blend.weights, [0.25, 0.75])
    for i in (0, 1, 2, 3, 500, 799):
        source = [a, b][blend.dataset_index[i]]
        np.testing.assert_array_equal(blend[i]["text"], source[int(blend.dataset_sample_index[i])]["text"])
    with pytest.raises(ValueError, match="blended dataset 1 has 500 samples"):
        BlendedDataset([a, MockGPTDataset(500, 4, 100, 1)], [0.25, 0.75], size=800)
    with pytest.raises(ValueError, match="one weight per dataset"):
        BlendedDataset([a, b], [1.0], size=10)


def test_oversampling_rule():
    assert blended_num_samples(0.3, 1000) == 302  # ceil(0.3 * 1000 * 1.005) = ceil(301.5)
    assert blended_num_samples(1.0, 0) == 0
