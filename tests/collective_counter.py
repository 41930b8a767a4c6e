"""Count every torch.distributed call: each public function of the torch.distributed namespace is wrapped.

    with count_distributed_calls() as calls:
        ...forward / backward / step...
    assert calls["all_reduce"] == 2

`calls` maps a function name to its number of calls (query helpers such as get_rank are counted too;
assertions pick the collectives). Our code calls `dist.<name>` at call time, so no call escapes.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import torch.distributed as dist

COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_single", "all_gather_into_tensor", "all_gather_object",
    "reduce_scatter", "reduce_scatter_single", "reduce_scatter_tensor", "reduce", "broadcast",
    "broadcast_object_list", "gather", "scatter", "all_to_all", "all_to_all_single", "barrier",
    "send", "recv", "isend", "irecv", "batch_isend_irecv", "all_reduce_coalesced",
)  # fmt: skip


def _counting(name: str, function: Callable, calls: Counter) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[name] += 1
        return function(*args, **kwargs)

    return wrapper


@contextmanager
def count_distributed_calls() -> Iterator[Counter]:
    """Wrap every public function of torch.distributed for the duration of the block."""
    calls: Counter = Counter()
    originals = {
        name: value
        for name, value in vars(dist).items()
        if not name.startswith("_") and inspect.isfunction(value)
    }
    for name, function in originals.items():
        setattr(dist, name, _counting(name, function, calls))
    try:
        yield calls
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)


def collectives(calls: Counter) -> dict[str, int]:
    """The communicating calls among `calls` (every name that is not a query such as get_rank)."""
    return {name: n for name, n in calls.items() if name in COLLECTIVES}
