"""Count every torch.distributed collective and point-to-point call, by patching the torch.distributed
functions themselves (so calls that bypass our own mappings are counted too).

    with count_collectives() as calls:
        loss = model(...)
    assert calls == {"all_reduce": 2}
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch.distributed as dist

COMMUNICATION = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
    "reduce_scatter_tensor", "broadcast", "broadcast_object_list", "reduce", "gather", "scatter",
    "all_to_all", "all_to_all_single", "send", "recv", "isend", "irecv", "batch_isend_irecv", "barrier",
)  # fmt: skip


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter]:
    """Yield a Counter {function name: calls} filled while the block runs; the functions are restored after."""
    calls: Counter = Counter()
    originals = {name: getattr(dist, name) for name in COMMUNICATION if hasattr(dist, name)}

    def wrap(name, function):
        def counted(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return counted

    for name, function in originals.items():
        setattr(dist, name, wrap(name, function))
    try:
        yield calls
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)
