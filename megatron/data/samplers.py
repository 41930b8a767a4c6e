"""Batch samplers that shard micro batches over data-parallel ranks and resume from `consumed_samples`.

A global step consumes micro_batch_size * data_parallel_size samples (per micro batch of gradient
accumulation): the global micro batch is split into data_parallel_size slices and rank r gets slice r.
`consumed_samples` (saved in the checkpoint) is the number of samples all ranks have consumed so far.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def _check(total_samples: int, consumed_samples: int, micro_batch_size: int, rank: int, size: int) -> None:
    if total_samples <= 0:
        raise ValueError(f"no samples to draw from (total_samples={total_samples})")
    if micro_batch_size <= 0 or size <= 0:
        raise ValueError(
            f"micro_batch_size ({micro_batch_size}) and data_parallel_size ({size}) must be positive"
        )
    if not 0 <= rank < size:
        raise ValueError(f"data_parallel_rank {rank} is not in [0, {size})")
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples {consumed_samples} is negative")


class MegatronPretrainingSampler(Sampler[list[int]]):
    """Samples in order: global micro batch g is indices [g * B, (g + 1) * B), B = micro_batch_size * dp size.

    Iteration starts at `consumed_samples` and ends at `total_samples`; this rank yields indices
    [start + rank * micro_batch_size, start + (rank + 1) * micro_batch_size) of each global micro batch. A
    last incomplete global micro batch is dropped, or with drop_last=False this rank's part of it is yielded
    (possibly short or empty, then skipped).
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        _check(total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        if consumed_samples >= total_samples:
            raise ValueError(
                f"consumed_samples {consumed_samples} is not below total_samples {total_samples}"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.global_batch = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        """Micro batches this rank will yield."""
        full, rest = divmod(self.total_samples - self.consumed_samples, self.global_batch)
        has_partial = not self.drop_last and rest > self.data_parallel_rank * self.micro_batch_size
        return full + int(has_partial)

    def __iter__(self) -> Iterator[list[int]]:
        offset = self.data_parallel_rank * self.micro_batch_size
        for start in range(self.consumed_samples, self.total_samples, self.global_batch):
            if start + self.global_batch > self.total_samples and self.drop_last:
                return
            first = start + offset
            last = min(first + self.micro_batch_size, self.total_samples)
            if first < last:
                yield list(range(first, last))


class MegatronPretrainingRandomSampler(Sampler[list[int]]):
    """Epoch-shuffled sampling for fine-tuning (Megatron's dataloader_type 'cyclic').

    Each epoch visits E = total_samples - total_samples % B samples (B = micro_batch_size * dp size): the
    first E entries of torch.randperm(total_samples) drawn with a generator seeded with seed + epoch, cut
    into global micro batches of B, rank r taking slice r. epoch = consumed_samples // E, and iteration
    resumes at consumed_samples % E inside it. One `iter()` yields the rest of the current epoch, advancing
    `consumed_samples`, so the next `iter()` starts the next epoch (wrap the loader in a cycling iterator).
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        seed: int = 0,
    ) -> None:
        _check(total_samples, consumed_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        self.global_batch = micro_batch_size * data_parallel_size
        if total_samples < self.global_batch:
            raise ValueError(
                f"{total_samples} samples do not fill one global micro batch of {self.global_batch}"
            )
        if consumed_samples % self.global_batch:
            raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of {self.global_batch}")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.seed = seed
        self.samples_per_epoch = total_samples - total_samples % self.global_batch

    def __len__(self) -> int:
        """Micro batches the next `iter()` yields on this rank."""
        return (self.samples_per_epoch - self.consumed_samples % self.samples_per_epoch) // self.global_batch

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = divmod(self.consumed_samples, self.samples_per_epoch)
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        order = torch.randperm(self.total_samples, generator=generator)[: self.samples_per_epoch].tolist()
        offset = self.data_parallel_rank * self.micro_batch_size
        for begin in range(start, self.samples_per_epoch, self.global_batch):
            self.consumed_samples += self.global_batch
            yield order[begin + offset : begin + offset + self.micro_batch_size]


def build_data_loader(
    dataset: Optional[Dataset],
    consumed_samples: int,
    micro_batch_size: int,
    parallel_rank: int,
    parallel_size: int,
    num_workers: int = 0,
    dataloader_type: str = "single",
    seed: int = 0,
) -> Optional[DataLoader]:
    """A DataLoader (default collate: dict of stacked tensors) over this data-parallel rank's micro batches.

    dataloader_type 'single' uses MegatronPretrainingSampler over len(dataset) samples (pretraining),
    'cyclic' MegatronPretrainingRandomSampler (fine-tuning). None for a None dataset (an empty split).
    """
    if dataset is None:
        return None
    total = len(dataset)  # type: ignore[arg-type]
    sampler: Sampler[list[int]]
    if dataloader_type == "single":
        sampler = MegatronPretrainingSampler(
            total, consumed_samples, micro_batch_size, parallel_rank, parallel_size
        )
    elif dataloader_type == "cyclic":
        sampler = MegatronPretrainingRandomSampler(
            total, consumed_samples, micro_batch_size, parallel_rank, parallel_size, seed
        )
    else:
        raise ValueError(f"--dataloader-type {dataloader_type!r}: expected 'single' or 'cyclic'")
    # A private generator: creating an iterator must not draw from the global torch RNG, or a resumed run
    # (which creates its iterators after restoring the RNG state) would see different dropout masks.
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )
