"""Data pipeline on several gloo ranks: rank 0 builds the shared index cache, every rank loads the same
indices, and the data-parallel loaders together yield the single-process global batches."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch.distributed as dist

from megatron.data.bert_dataset import BertDataset, BertMaskingConfig
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed_dataset import IndexedDataset
from megatron.data.samplers import build_data_loader
from tests.distributed_utils import run_distributed
from tests.test_data_bert_dataset import IDS, write_sentence_dataset
from tests.test_data_gpt_dataset import doc_lengths, write_positional_dataset

MICRO_BATCH = 2


def _pipeline(rank: int, world_size: int, gpt_prefix: str, bert_prefix: str, cache: str) -> dict:
    gpt = GPTDataset("train", IndexedDataset(gpt_prefix), np.arange(40), 64, 9, seed=11, cache_dir=cache)
    bert = BertDataset(
        "train",
        IndexedDataset(bert_prefix),
        np.arange(60),
        50,
        3,
        IDS,
        BertMaskingConfig(32),
        cache_dir=cache,
    )
    loader = build_data_loader(
        gpt,
        consumed_samples=4 * world_size,
        micro_batch_size=MICRO_BATCH,
        parallel_rank=rank,
        parallel_size=world_size,
    )
    return {
        "gpt": np.stack([gpt[i]["text"] for i in range(len(gpt))]),
        "bert": np.stack([bert[i]["text"] for i in range(len(bert))]),
        "batches": [batch["text"].numpy() for batch in loader],
        "distributed": dist.is_initialized(),
    }


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_share_the_cache_and_split_the_global_batch(tmp_path, world_size):
    gpt_prefix, bert_prefix = str(tmp_path / "gpt"), str(tmp_path / "bert")
    write_positional_dataset(gpt_prefix, doc_lengths(4, 40))
    write_sentence_dataset(bert_prefix, seed=1, num_docs=60)
    single = _pipeline(0, 1, gpt_prefix, bert_prefix, str(tmp_path / "single"))
    results = run_distributed(_pipeline, world_size, (gpt_prefix, bert_prefix, str(tmp_path / "shared")))
    assert all(r["distributed"] for r in results)
    for r in results:
        np.testing.assert_array_equal(r["gpt"], single["gpt"])
        np.testing.assert_array_equal(r["bert"], single["bert"])
    assert len([f for f in os.listdir(tmp_path / "shared") if f.endswith(".npy")]) == 4  # built once
    # Step s of the run: ranks' micro batches side by side = samples [c + s*B, c + (s+1)*B) of the dataset.
    consumed, global_batch = 4 * world_size, MICRO_BATCH * world_size
    steps = (len(single["gpt"]) - consumed) // global_batch
    assert steps > 0 and all(len(r["batches"]) == steps for r in results)
    for step in range(steps):
        start = consumed + step * global_batch
        together = np.concatenate([r["batches"][step] for r in results])
        np.testing.assert_array_equal(together, single["gpt"][start : start + global_batch])
