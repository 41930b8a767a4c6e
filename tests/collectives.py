"""Record every torch.distributed collective and point-to-point call made inside a block.

    with record_collectives() as calls:
        loss = model(...)
        forward_calls = list(calls)
        loss.backward()
    assert len(calls.matching("all_reduce", ranks=tp_ranks)) == ...

Every public communication function of torch.distributed (and its private aliases) is replaced, in both
`torch.distributed` and `torch.distributed.distributed_c10d`, by a wrapper that appends a `Collective`
(function name, ranks of the group, number of elements) and calls the original. A call made from inside
another recorded call (all_gather_object runs all_gather) is recorded once, as the outer call. Code
that bound a function before the block (`from torch.distributed import all_reduce`) escapes the patch,
so the project always calls them as `dist.<name>`; `test_collectives_recorder_sees_everything` checks
the recorder itself.
"""

from __future__ import annotations

import inspect
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# Everything in torch.distributed that talks to another rank.
COMMUNICATION_FUNCTIONS = (
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "_all_gather_base",
    "all_gather_coalesced",
    "all_gather_object",
    "reduce_scatter",
    "reduce_scatter_single",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "reduce",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "scatter",
    "scatter_object_list",
    "all_to_all",
    "all_to_all_single",
    "send",
    "recv",
    "isend",
    "irecv",
    "send_object_list",
    "recv_object_list",
    "batch_isend_irecv",
    "barrier",
    "monitored_barrier",
)


@dataclass(frozen=True)
class Collective:
    """One recorded call: the function's name, the global ranks of its group, the elements it moved."""

    name: str
    ranks: tuple[int, ...]
    numel: int


class CollectiveLog(list):
    """The recorded calls, in order."""

    def matching(
        self, name: Optional[str] = None, ranks: Optional[tuple[int, ...]] = None
    ) -> list[Collective]:
        """The calls of function `name` (any if None) over the group of `ranks` (any if None)."""
        return [c for c in self if name in (None, c.name) and (ranks is None or c.ranks == tuple(ranks))]


def group_ranks(group: Optional[dist.ProcessGroup]) -> tuple[int, ...]:
    """Global ranks of `group` (None: the default group)."""
    if group is None or group is dist.GroupMember.WORLD:
        return tuple(range(dist.get_world_size()))
    return tuple(dist.get_process_group_ranks(group))


def _numel(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, (list, tuple)):
        return sum(_numel(v) for v in value)
    return 0


def _describe(name: str, signature: inspect.Signature, args: tuple, kwargs: dict) -> Collective:
    bound = signature.bind_partial(*args, **kwargs).arguments
    if name == "batch_isend_irecv":
        ops = bound.get("p2p_op_list", [])
        ranks = tuple(sorted({r for op in ops for r in group_ranks(op.group)}))
        return Collective(name, ranks, sum(op.tensor.numel() for op in ops))
    tensors = [v for k, v in bound.items() if k not in ("group", "async_op", "op", "src", "dst", "tag")]
    return Collective(name, group_ranks(bound.get("group")), _numel(tensors))


@contextmanager
def record_collectives() -> Iterator[CollectiveLog]:
    """Patch every communication function of torch.distributed for the block; yield the growing log."""
    log = CollectiveLog()
    depth = threading.local()
    lock = threading.Lock()
    originals: dict[tuple[Any, str], Callable] = {}

    def wrap(name: str, original: Callable) -> Callable:
        signature = inspect.signature(original)

        def recorded(*args: Any, **kwargs: Any) -> Any:
            outer = getattr(depth, "value", 0) == 0
            if outer:
                with lock:
                    log.append(_describe(name, signature, args, kwargs))
            depth.value = getattr(depth, "value", 0) + 1
            try:
                return original(*args, **kwargs)
            finally:
                depth.value -= 1

        return recorded

    for name in COMMUNICATION_FUNCTIONS:
        original = getattr(c10d, name, None) or getattr(dist, name, None)
        if original is None:
            continue
        wrapper = wrap(name, original)
        for module in (dist, c10d):
            if hasattr(module, name):
                originals[(module, name)] = getattr(module, name)
                setattr(module, name, wrapper)
    try:
        yield log
    finally:
        for (module, name), original in originals.items():
            setattr(module, name, original)


@contextmanager
def count_collectives() -> Iterator[Counter]:
    """{function name: calls} of every communication call made inside the block (complete when it ends).

    with count_collectives() as calls:
        loss = model(...)
    assert calls == {"all_reduce": 2}
    """
    counts: Counter = Counter()
    with record_collectives() as log:
        yield counts
    counts.update(call.name for call in log)
