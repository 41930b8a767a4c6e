"""Megatron-LM's greedy blending index, exact, vectorised with numpy.

The rule (Megatron's helpers.cpp `build_blending_indices`): with weights w_k (summing to 1) and c_k
samples taken from dataset k so far, sample i comes from

    k(i) = argmax_k (w_k * max(i, 1) - c_k)        (float64; the first k on ties)

the dataset furthest behind its share. Each choice depends on all earlier ones, so the plain form is a
sequential loop (`blend_sequential`, about 0.5 us per sample in Python).

Vectorised form. The state after i samples is the count vector c(i); the rule needs nothing else. So the
samples are cut into blocks of B, and all blocks are run side by side: each numpy operation of a step
works on a [K, blocks] array. A block's true starting counts are not known before the blocks in
front of it are done, so each block starts `warmup` samples early from a guess: the largest-remainder
apportionment of those samples, close to the greedy counts. The greedy rule pulls a wrong start back
onto the true trajectory within a few steps (a dataset that is ahead is not picked until the others
catch up), so after the warm-up the speculative counts nearly always equal the true ones. Then a sequential pass over the blocks checks
each block's starting counts against the previous block's end; where they differ, the exact loop
re-runs that block from the true counts until its counts coincide with the speculative ones (from then
on the two runs are identical), or to the block's end. The result is therefore always exactly the
sequential rule's, whatever the guess; the guess only decides the speed. The float64 expression
w_k * x - c_k is evaluated with the same IEEE operations as the loop (and Megatron's C++), so ties and
roundings agree bit for bit.
"""

from __future__ import annotations

import numpy as np

BLOCKS = 32_768  # blocks run side by side: enough that one numpy call per step is cheap per sample
MIN_BLOCK = 1_024
WARMUP = 64
OUT_STEPS = 256  # steps buffered before being written out, block by block
WRITE_COLUMNS = 256  # blocks written out at a time: 256 x 256 int64 = 512 KiB, within a core's cache


def blend_sequential(
    weights: np.ndarray, counts: list[int], start: int, stop: int, chosen: np.ndarray, positions: np.ndarray
) -> list[int]:
    """The rule as a loop over samples start..stop-1 from `counts` (taken before `start`); fills
    chosen[i] and positions[i] (the sample's index within its dataset); returns the counts at `stop`."""
    w = [float(x) for x in weights]
    counts = [int(c) for c in counts]
    others = range(1, len(w))
    for i in range(start, stop):
        x = float(i) if i > 0 else 1.0
        best, best_error = 0, w[0] * x - counts[0]
        for k in others:
            error = w[k] * x - counts[k]
            if error > best_error:
                best, best_error = k, error
        chosen[i] = best
        positions[i] = counts[best]
        counts[best] += 1
    return counts


def _apportion(weights: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """[len(samples), K] float64: largest-remainder split of each count among the datasets (quota
    w_k * max(n - 1, 1) for n samples), a close guess of the greedy counts after n samples."""
    quota = weights[None, :] * np.maximum(samples - 1, 1).astype(np.float64)[:, None]
    floor = np.floor(quota)
    left = samples - floor.sum(axis=1).astype(np.int64)
    rank = np.argsort(np.argsort(floor - quota, axis=1, kind="stable"), axis=1, kind="stable")
    return floor + (rank < left[:, None])


def _speculate(
    weights: np.ndarray,
    starts: np.ndarray,
    block: int,
    warmup: int,
    chosen: np.ndarray,
    positions: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the rule on every block [s, s + block) from a guess at s - warmup, all blocks at once; writes
    the block's samples into chosen/positions ([blocks, block] views); returns the counts at each block's
    start and end ([blocks, K] each)."""
    num, K = starts.size, weights.size
    counts = np.ascontiguousarray(_apportion(weights, starts - warmup).T)  # [K, blocks] float64
    flat_counts = counts.reshape(-1)
    x = (starts - warmup).astype(np.float64)
    column = np.arange(num, dtype=np.int64)
    row_start = np.arange(K, dtype=np.int64) * num
    w = weights[:, None]
    small = np.int16 if K < 2**15 else np.int64
    rank = (K - np.arange(K, dtype=small))[:, None]  # K for dataset 0 ... 1 for the last
    errors, tie, key = np.empty((K, num)), np.empty((K, num), bool), np.empty((K, num), small)
    best, index, where, position = np.empty(num), np.empty(num, small), np.empty(num, np.int64), np.empty(num)
    out_index, out_position = np.empty((OUT_STEPS, num), np.int16), np.empty((OUT_STEPS, num), np.int64)
    start_counts = None
    for t in range(warmup + block):
        if t == warmup:
            start_counts = counts.T.copy()
        np.multiply(w, x, out=errors)  # error_k = w_k * x - c_k, exactly as the loop computes it
        np.subtract(errors, counts, out=errors)
        np.max(errors, axis=0, out=best)
        np.equal(errors, best, out=tie)
        np.multiply(tie, rank, out=key)  # the first k reaching the maximum has the largest rank
        np.max(key, axis=0, out=index)
        np.subtract(small(K), index, out=index)
        np.take(row_start, index, out=where)  # flat position of counts[index, block]
        np.add(where, column, out=where)
        np.take(flat_counts, where, out=position)
        flat_counts[where] = position + 1.0
        x += 1.0
        step = t - warmup
        if step >= 0:
            out_index[step % OUT_STEPS] = index
            out_position[step % OUT_STEPS] = position
            if step % OUT_STEPS == OUT_STEPS - 1 or step == block - 1:
                first = step - step % OUT_STEPS
                _write_transposed(chosen, out_index[: step - first + 1], first)
                _write_transposed(positions, out_position[: step - first + 1], first)
    return start_counts, counts.T.copy()


def _write_transposed(out: np.ndarray, buffer: np.ndarray, first: int) -> None:
    """out[b, first + t] = buffer[t, b], a slab of columns at a time so that the reads stay in cache (a
    plain transposed assignment reads the buffer with a stride of a whole row per element)."""
    steps = buffer.shape[0]
    for start in range(0, buffer.shape[1], WRITE_COLUMNS):
        stop = start + WRITE_COLUMNS
        out[start:stop, first : first + steps] = buffer[:, start:stop].T


def _repair(
    weights: np.ndarray, counts: list[int], guessed: list[int], start: int, stop: int,
    chosen: np.ndarray, positions: np.ndarray,
) -> list[int]:  # fmt: skip
    """Re-run samples start.. from the true `counts` until they equal the speculative run's (which began
    at `guessed` and wrote chosen[start:stop]); returns the true counts at the point they met, or at stop
    if they never did (then the caller keeps these counts instead of the speculative end)."""
    i = start
    while i < stop and counts != guessed:
        guessed[int(chosen[i])] += 1
        counts = blend_sequential(weights, counts, i, i + 1, chosen, positions)
        i += 1
    return counts


def build_blending_indices(
    weights: np.ndarray, size: int, block: int | None = None, warmup: int = WARMUP
) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16 [size], dataset_sample_index int64 [size]) of Megatron's greedy blend (module
    docstring): sample i is sample dataset_sample_index[i] of dataset dataset_index[i]. `block` and
    `warmup` change only the speed (tests pass small ones to exercise the repair path)."""
    w = np.asarray(weights, dtype=np.float64)
    block = block or max(MIN_BLOCK, -(-size // BLOCKS))
    warmup = min(warmup, block - 1)  # every speculative run starts at a sample i >= 1
    num = max(0, -(-(size - block) // block))  # blocks after the first, run side by side
    chosen = np.empty(block * (num + 1), np.int16)
    positions = np.empty(block * (num + 1), np.int64)
    end = blend_sequential(w, [0] * w.size, 0, min(size, block), chosen, positions)
    if num:
        starts = np.arange(1, num + 1, dtype=np.int64) * block
        chosen_blocks = chosen[block:].reshape(num, block)
        position_blocks = positions[block:].reshape(num, block)
        begin, finish = _speculate(w, starts, block, warmup, chosen_blocks, position_blocks)
        for b, start in enumerate(starts.tolist()):
            guessed = [int(c) for c in begin[b]]
            if end != guessed:
                met = _repair(w, end, guessed, start, start + block, chosen, positions)
                if met != guessed:  # never met: the true end replaces the speculative one
                    end = met
                    continue
            end = [int(c) for c in finish[b]]
    return chosen[:size], positions[:size]
