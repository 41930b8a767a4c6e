"""--mock-data GPT samples are learnable: counting sequences from a random start, and a short training run
on them shows the loss falling (uniform random tokens could not)."""

from __future__ import annotations

import math

import numpy as np

import pretrain_gpt
from megatron.data.mock_dataset import MockGPTDataset


def test_mock_gpt_samples_count_up_from_a_random_start():
    data = MockGPTDataset(50, seq_length=7, vocab_size=20, seed=3)
    starts = set()
    for i in range(50):
        text = data[i]["text"]
        assert text.dtype == np.int64 and text.shape == (8,)
        np.testing.assert_array_equal(text, (text[0] + np.arange(8)) % 20)
        np.testing.assert_array_equal(text, MockGPTDataset(50, 7, 20, seed=3)[i]["text"])  # deterministic
        starts.add(int(text[0]))
    assert len(starts) > 10


def test_mock_data_smoke_run_shows_learning():
    argv = (
        "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
        "--micro-batch-size 4 --lr 1e-2 --lr-warmup-iters 2 --train-iters 30 --log-interval 5 --eval-iters 0 "
        "--seed 7 --mock-data --tokenizer-type NullTokenizer --vocab-size 100"
    ).split()
    losses = [step["lm loss"] for step in pretrain_gpt.main(argv)["losses"]]
    assert losses[0] > math.log(100) - 1.0  # starts near uniform over the vocabulary
    assert losses[-1] < 0.5 * losses[0], losses  # and learns the rule
