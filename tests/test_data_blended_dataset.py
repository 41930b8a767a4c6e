"""Megatron's greedy blending rule, weights met, and BlendedDataset's lookups and checks."""

from __future__ import annotations

import numpy as np
import pytest

from megatron.data.blended_dataset import BlendedDataset
from megatron.data.dataset_utils import blended_num_samples
from megatron.data.helpers import build_blending_indices
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
