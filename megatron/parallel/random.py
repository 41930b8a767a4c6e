"""Random-number handling for dropout under tensor parallelism, and activation recompute that respects it.

Two streams of randomness are needed (Megatron-LM's scheme):

* the default torch generator, seeded identically on all TP ranks, for dropout on activations that are
  duplicated across the TP group (after the row-parallel all-reduce, on the residual stream), so that
  all TP ranks keep computing identical copies;
* a named tracker state 'model-parallel-rng', seeded differently on each TP rank, for dropout on
  activations that are split across the TP group (attention probabilities of this rank's heads), so that
  each shard gets an independent mask, as one big model would.

`RNGStatesTracker.fork(name)` swaps a named state into the default generators for the duration of a
block and saves the advanced state back on exit. Each named state holds a CPU generator state and, when
CUDA is available, the current CUDA device's generator state, so dropout on either device is covered.

The tracker returned by `get_rng_tracker()` is one module-level object, deliberately mirroring torch's
own global default generator (whose state it swaps); `model_parallel_seed` resets and seeds it, and
checkpoints save and restore it through `get_states()` / `set_states()`.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from megatron.parallel.state import ParallelState

MODEL_PARALLEL_RNG = "model-parallel-rng"
TP_SEED_OFFSET = 2718  # the model-parallel stream of TP rank r is seeded seed + 2718 + r, as in Megatron-LM

# A generator state per device: {"cpu": ByteTensor} plus "cuda": ByteTensor when CUDA is available.
DeviceRNGStates = dict[str, Tensor]


def get_device_rng_states() -> DeviceRNGStates:
    """The default CPU generator's state and, when CUDA is available, the current CUDA device's."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_device_rng_states(states: DeviceRNGStates) -> None:
    """Load the default generators from `states` (a CUDA state is ignored when CUDA is unavailable)."""
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _seeded_device_states(seed: int) -> DeviceRNGStates:
    """Generator states as if the default generators had just been seeded with `seed`."""
    states = {"cpu": torch.Generator().manual_seed(seed).get_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.Generator(device="cuda").manual_seed(seed).get_state()
    return states


class RNGStatesTracker:
    """Named generator states that can be swapped into torch's default generators with `fork(name)`."""

    def __init__(self) -> None:
        self._states: dict[str, DeviceRNGStates] = {}
        self._seeds: set[int] = set()

    def reset(self) -> None:
        """Forget all named states."""
        self._states = {}
        self._seeds = set()

    def add(self, name: str, seed: int) -> None:
        """Create state `name` seeded with `seed`; names and seeds must be unused (distinct streams)."""
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists")
        if seed in self._seeds:
            raise ValueError(f"seed {seed} is already used by another RNG state")
        self._seeds.add(seed)
        self._states[name] = _seeded_device_states(seed)

    def get_states(self) -> dict[str, DeviceRNGStates]:
        """A copy of the named states (for checkpoints)."""
        return {name: dict(states) for name, states in self._states.items()}

    def set_states(self, states: dict[str, DeviceRNGStates]) -> None:
        """Replace the named states (from a checkpoint); seeds of later `add` calls are not checked against them."""
        self._states = {name: dict(device_states) for name, device_states in states.items()}

    @contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block with the default generators set to state `name`; save its advance on exit."""
        if name not in self._states:
            raise KeyError(f"RNG state {name!r} was not added (call model_parallel_seed first)")
        outside = get_device_rng_states()
        set_device_rng_states(self._states[name])
        try:
            yield
        finally:
            self._states[name] = get_device_rng_states()
            set_device_rng_states(outside)


_RNG_TRACKER = RNGStatesTracker()


def get_rng_tracker() -> RNGStatesTracker:
    """The process-wide tracker (module-level, like torch's default generator whose state it swaps)."""
    return _RNG_TRACKER


def model_parallel_seed(seed: int, parallel: ParallelState) -> None:
    """Seed python, numpy and torch with `seed` (same on all TP ranks) and the tracker's
    'model-parallel-rng' with seed + 2718 + tp_rank (different on each TP rank)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tracker = get_rng_tracker()
    tracker.reset()
    tracker.add(MODEL_PARALLEL_RNG, seed + TP_SEED_OFFSET + parallel.tp_rank)


class _CheckpointFunction(torch.autograd.Function):
    """Run `function` without keeping activations; rerun it in backward under the same RNG states."""

    @staticmethod
    def forward(ctx, function: Callable, *args: Any) -> Any:
        ctx.function = function
        ctx.device_rng_states = get_device_rng_states()
        ctx.tracker_states = get_rng_tracker().get_states()
        ctx.tensor_positions = [i for i, a in enumerate(args) if isinstance(a, Tensor)]
        ctx.non_tensor_args = [None if isinstance(a, Tensor) else a for a in args]
        ctx.save_for_backward(*(args[i] for i in ctx.tensor_positions))
        return function(*args)  # autograd.Function.forward runs under no_grad: no activations are kept

    @staticmethod
    def backward(ctx, *grad_outputs: Tensor) -> tuple[Any, ...]:
        args = list(ctx.non_tensor_args)
        for position, tensor in zip(ctx.tensor_positions, ctx.saved_tensors):
            args[position] = tensor.detach().requires_grad_(tensor.requires_grad)

        # Recompute under the forward's RNG states (same dropout masks), then restore the current ones.
        tracker = get_rng_tracker()
        current_device_states, current_tracker_states = get_device_rng_states(), tracker.get_states()
        set_device_rng_states(ctx.device_rng_states)
        tracker.set_states(ctx.tracker_states)
        try:
            with torch.enable_grad():
                outputs = ctx.function(*args)
        finally:
            set_device_rng_states(current_device_states)
            tracker.set_states(current_tracker_states)

        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if isinstance(o, Tensor) and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads = [a.grad if isinstance(a, Tensor) else None for a in args]
        return (None, *input_grads)


def checkpoint(function: Callable, *args: Any) -> Any:
    """Activation recompute: function(*args) whose intermediate activations are recomputed in backward.

    The default CPU/CUDA generator states and the tracker's named states are saved at forward and
    restored for the recompute, so dropout masks (inside and outside `fork()`) and hence gradients are
    bitwise those of the plain forward. Gradients reach the parameters used by `function` only through
    the recompute, so at least one tensor argument must require grad when autograd is on. Under
    torch.no_grad this simply calls function(*args).
    """
    if not torch.is_grad_enabled():
        return function(*args)
    if not any(isinstance(a, Tensor) and a.requires_grad for a in args):
        raise ValueError("checkpoint(): no tensor argument requires grad, so the recompute would never run")
    return _CheckpointFunction.apply(function, *args)
