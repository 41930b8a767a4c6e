"""Number of microbatches per iteration, with Megatron's optional global-batch-size rampup."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional


class MicroBatchCalculator:
    """global batch = micro batch x data-parallel size x number of microbatches.

    With `rampup = (start, increment, samples)` the global batch starts at `start` and grows by `increment`
    each time another `samples / ((global - start) / increment)` samples have been consumed, until it
    reaches `global_batch_size` (Megatron's --rampup-batch-size).
    """

    def __init__(
        self,
        global_batch_size: int,
        micro_batch_size: int,
        data_parallel_size: int,
        rampup: Optional[Sequence[int]] = None,
    ) -> None:
        self.global_batch_size = global_batch_size
        self.micro_batch_times_dp = micro_batch_size * data_parallel_size
        self.rampup = tuple(rampup) if rampup is not None else None
        self.current_global_batch_size = global_batch_size
        self.update(0)

    def update(self, consumed_samples: int) -> None:
        """Recompute the current global batch size after `consumed_samples` training samples."""
        if self.rampup is None:
            self.current_global_batch_size = self.global_batch_size
            return
        start, increment, ramp_samples = self.rampup
        num_increments = (self.global_batch_size - start) // increment
        if num_increments == 0 or consumed_samples >= ramp_samples:
            self.current_global_batch_size = self.global_batch_size
            return
        samples_per_increment = ramp_samples / num_increments
        steps = int(consumed_samples / samples_per_increment)
        self.current_global_batch_size = min(start + steps * increment, self.global_batch_size)

    @property
    def num_micro_batches(self) -> int:
        return self.current_global_batch_size // self.micro_batch_times_dp
