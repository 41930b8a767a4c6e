"""What a run derives or counts as it goes, kept apart from the flags.

`args` (the parsed flags) is read-only after `parse_args`. The values a run derives from its tokenizer
(the padded vocabulary size, the end-of-document id) and the counters it advances (iteration, consumed
training and validation samples) live in one `RunState`, owned by the training loop and passed to whoever
needs them. A checkpoint still stores them where Megatron-LM stores them, as attributes of the saved
`args` (`padded_vocab_size`, `consumed_train_samples`, `consumed_valid_samples`, ...): `checkpoint_args`
builds that Namespace and `resume` reads the counters back from it.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from typing import Optional

from megatron.tokenizer import AbstractTokenizer, vocab_size_with_padding


@dataclass
class RunState:
    """Derived sizes and progress counters of one run (see the module docstring)."""

    padded_vocab_size: int
    eod_token: Optional[int] = None
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_valid_samples: int = 0

    @classmethod
    def from_tokenizer(cls, tokenizer: AbstractTokenizer, args: argparse.Namespace) -> RunState:
        """The vocabulary padded to a multiple of --make-vocab-size-divisible-by x TP, and the EOD id."""
        return cls(padded_vocab_size=padded_vocab_size(tokenizer, args), eod_token=_eod_or_none(tokenizer))

    def checkpoint_args(self, args: argparse.Namespace) -> argparse.Namespace:
        """A copy of `args` with this state's values under Megatron's attribute names, for a checkpoint."""
        saved = copy.copy(args)
        saved.padded_vocab_size = self.padded_vocab_size
        saved.consumed_train_samples = self.consumed_train_samples
        saved.consumed_valid_samples = self.consumed_valid_samples
        if self.eod_token is not None:
            saved.eod_token = self.eod_token
        return saved

    def resume(self, iteration: int, checkpoint_args: argparse.Namespace) -> None:
        """Continue the counters of a loaded checkpoint (its iteration and its args' sample counts)."""
        self.iteration = iteration
        self.consumed_train_samples = getattr(checkpoint_args, "consumed_train_samples", 0)
        self.consumed_valid_samples = getattr(checkpoint_args, "consumed_valid_samples", 0)


def padded_vocab_size(tokenizer: AbstractTokenizer, args: argparse.Namespace) -> int:
    """The tokenizer's vocabulary padded as Megatron pads it (a multiple of divisible-by x TP size)."""
    return vocab_size_with_padding(
        tokenizer.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
    )


def _eod_or_none(tokenizer: AbstractTokenizer) -> Optional[int]:
    try:
        return tokenizer.eod
    except (AttributeError, NotImplementedError):  # WordPiece tokenizers have no end-of-document token
        return None
