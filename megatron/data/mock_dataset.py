"""Synthetic datasets with the GPT and BERT sample formats, for --mock-data, tests and benchmarks.

Sample i depends only on (seed, i): it is drawn from np.random.RandomState(seed + i). GPT samples are
learnable (each token is the previous one plus one, from a random start, as Megatron-Core's mock GPT
documents count upwards), so a smoke run with --mock-data shows its loss falling.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from megatron.data.bert_dataset import BertMaskingConfig, BertTokenIds, build_training_sample


class _SeededSamples(Dataset):
    """`num_samples` samples, sample i drawn from np.random.RandomState(seed + i): deterministic, and
    independent of the order in which samples are read."""

    def __init__(self, num_samples: int, seed: int) -> None:
        self.num_samples = num_samples
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def _rng(self, idx: int) -> np.random.RandomState:
        if not 0 <= idx < self.num_samples:
            raise IndexError(f"sample {idx} out of range for {self.num_samples} samples")
        return np.random.RandomState((self.seed + idx) % 2**32)


class MockGPTDataset(_SeededSamples):
    """`num_samples` samples {"text": np.int64 [seq_length + 1]}: the arithmetic sequence s, s + 1, ...
    modulo vocab_size from a random start s in [0, vocab_size); after the first token every next token is
    predictable, so a model's loss falls towards 0 as it learns the rule."""

    def __init__(self, num_samples: int, seq_length: int, vocab_size: int, seed: int) -> None:
        super().__init__(num_samples, seed)
        self.seq_length = seq_length
        self.vocab_size = vocab_size

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        start = self._rng(idx).randint(0, self.vocab_size)
        return {"text": (start + np.arange(self.seq_length + 1, dtype=np.int64)) % self.vocab_size}


class MockBertDataset(_SeededSamples):
    """`num_samples` BERT samples (the dict of bert_dataset.build_training_sample) from random sentences.

    Each sample has 2 to 6 sentences of 1 to 30 random non-special ids (ids >= `min_regular_id`, so a
    random token is never [CLS], [SEP], [MASK] or padding) and a target length of max_seq_length - 3.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        token_ids: BertTokenIds,
        config: BertMaskingConfig,
        min_regular_id: int = 1000,
    ) -> None:
        if min_regular_id >= token_ids.vocab_size:
            raise ValueError(
                f"min_regular_id {min_regular_id} must be below vocab_size {token_ids.vocab_size}"
            )
        super().__init__(num_samples, seed)
        self.token_ids = token_ids
        self.config = config
        self.min_regular_id = min_regular_id

    def __getitem__(self, idx: int) -> dict[str, np.ndarray]:
        rng = self._rng(idx)
        sentences = [
            rng.randint(self.min_regular_id, self.token_ids.vocab_size, size=rng.randint(1, 31))
            for _ in range(rng.randint(2, 7))
        ]
        return build_training_sample(
            sentences, self.config.max_seq_length - 3, self.token_ids, self.config, rng
        )
