"""What the downstream tasks share: their data error, text clean-up, BERT pair inputs, DP sharding.

A BERT input for a pair of texts A and B (GLUE's sentence pair; RACE's question+option and passage) is

    ids      [CLS] a_1 .. a_n [SEP] b_1 .. b_m [SEP] [PAD] ..     (exactly max_seq_length ids)
    types      0    0  ..  0    0    1  ..  1    1    0  ..
    padding    1    1  ..  1    1    1  ..  1    1    0  ..

If the pair does not fit, the end is cut: the first max_seq_length - 1 ids are kept and a [SEP] closes
the sequence (so a long B, the passage in RACE, loses its tail), as Megatron-LM's
`build_tokens_types_paddings_from_ids` does.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
from torch import Tensor

_WHITESPACE_RE = re.compile(r"\s+")


class TaskError(Exception):
    """A task that cannot run as asked: a data file that cannot be used (the message names the file, and
    the line for line-based files) or flags that do not fit the data (the message names the flags)."""


def clean_text(text: str) -> str:
    """Megatron's clean-up of task text: newlines and whitespace runs become one space, " . " becomes ". "
    (three passes, so runs such as " . . ." are joined too)."""
    text = _WHITESPACE_RE.sub(" ", text.replace("\n", " "))
    for _ in range(3):
        text = text.replace(" . ", ". ")
    return text


def build_pair_input(
    a_ids: list[int],
    b_ids: Optional[list[int]],
    max_seq_length: int,
    cls_id: int,
    sep_id: int,
    pad_id: int,
) -> tuple[list[int], list[int], list[int]]:
    """(ids, types, padding) of length `max_seq_length` for `[CLS] A [SEP] (B [SEP])` (module docstring)."""
    ids = [cls_id, *a_ids, sep_id]
    types = [0] * len(ids)
    if b_ids is not None:
        ids += [*b_ids, sep_id]
        types += [1] * (len(b_ids) + 1)
    if len(ids) > max_seq_length:
        ids = ids[: max_seq_length - 1] + [sep_id]
        types = types[: max_seq_length - 1] + [1 if b_ids is not None else 0]
    padding = [1] * len(ids)
    missing = max_seq_length - len(ids)
    return ids + [pad_id] * missing, types + [0] * missing, padding + [0] * missing


def pair_tensors(ids: list[int], types: list[int], padding: list[int]) -> dict[str, Tensor]:
    """The model inputs of one sequence, under the batch keys the fine-tuning code reads."""
    return {
        "text": torch.tensor(ids, dtype=torch.long),
        "types": torch.tensor(types, dtype=torch.long),
        "padding_mask": torch.tensor(padding, dtype=torch.long),
    }


def shard_range(num_items: int, rank: int, size: int) -> range:
    """The contiguous share of items 0..num_items-1 that data-parallel rank `rank` of `size` evaluates.

    The first num_items % size ranks get one item more, so every item is on exactly one rank and
    nothing is dropped (sums over ranks are exact).
    """
    base, extra = divmod(num_items, size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
