"""Samplers: data-parallel sharding of the global micro batch, resume from consumed_samples, the loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron.data.mock_dataset import MockGPTDataset
from megatron.data.samplers import (
    MegatronPretrainingRandomSampler,
    MegatronPretrainingSampler,
    build_data_loader,
)


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_pretraining_sampler_shards_global_batches(dp_size):
    per_rank = [list(MegatronPretrainingSampler(103, 0, 3, r, dp_size)) for r in range(dp_size)]
    steps = 103 // (3 * dp_size)
    assert all(len(batches) == steps for batches in per_rank)
    for step in range(steps):
        union = sum((per_rank[r][step] for r in range(dp_size)), [])
        assert union == list(
            range(step * 3 * dp_size, (step + 1) * 3 * dp_size)
        )  # the global batch, in order
    assert len(MegatronPretrainingSampler(103, 0, 3, 0, dp_size)) == steps


def test_pretraining_sampler_resumes():
    full = list(MegatronPretrainingSampler(100, 0, 2, 1, 3))
    resumed = list(MegatronPretrainingSampler(100, 36, 2, 1, 3))
    assert resumed == full[6:]


def test_pretraining_sampler_keeps_last_partial_batch():
    batches = [list(MegatronPretrainingSampler(10, 0, 2, r, 2, drop_last=False)) for r in range(2)]
    assert batches[0] == [[0, 1], [4, 5], [8, 9]] and batches[1] == [[2, 3], [6, 7]]
    assert [len(MegatronPretrainingSampler(10, 0, 2, r, 2, drop_last=False)) for r in range(2)] == [3, 2]


def test_pretraining_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="consumed_samples 10"):
        MegatronPretrainingSampler(10, 10, 2, 0, 1)
    with pytest.raises(ValueError, match="data_parallel_rank 2"):
        MegatronPretrainingSampler(10, 0, 2, 2, 2)


@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_random_sampler_epochs_and_sharding(dp_size):
    total, mb = 50, 2
    global_batch = mb * dp_size
    per_epoch = total - total % global_batch
    samplers = [MegatronPretrainingRandomSampler(total, 0, mb, r, dp_size, seed=4) for r in range(dp_size)]
    epochs = []
    for _ in range(2):
        batches = [list(s) for s in samplers]
        order = sum(
            (sum((batches[r][step] for r in range(dp_size)), []) for step in range(len(batches[0]))), []
        )
        assert len(order) == per_epoch == len(set(order)) and set(order) <= set(range(total))
        epochs.append(order)
    assert epochs[0] != epochs[1]
    assert all(s.consumed_samples == 2 * per_epoch for s in samplers)


def test_random_sampler_resumes_mid_epoch():
    full = list(MegatronPretrainingRandomSampler(40, 0, 4, 1, 2, seed=1))
    resumed = MegatronPretrainingRandomSampler(40, 24, 4, 1, 2, seed=1)
    assert len(resumed) == 2 and list(resumed) == full[3:]
    next_epoch = list(MegatronPretrainingRandomSampler(40, 40 + 8, 4, 1, 2, seed=1))
    assert next_epoch == list(MegatronPretrainingRandomSampler(40, 40, 4, 1, 2, seed=1))[1:]


def test_data_loader_batches():
    dataset = MockGPTDataset(30, seq_length=6, vocab_size=50, seed=0)
    loader = build_data_loader(
        dataset, consumed_samples=8, micro_batch_size=4, parallel_rank=1, parallel_size=2
    )
    batches = list(loader)
    assert len(batches) == (30 - 8) // 8
    first = batches[0]["text"]
    assert first.dtype == torch.int64 and first.shape == (4, 7)
    np.testing.assert_array_equal(first[0].numpy(), dataset[12]["text"])
    assert build_data_loader(None, 0, 4, 0, 1) is None
    with pytest.raises(ValueError, match="--dataloader-type"):
        build_data_loader(dataset, 0, 4, 0, 1, dataloader_type="nope")
