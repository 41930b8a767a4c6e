"""Merge tensor-parallel (TP) shards into whole tensors, split whole tensors into shards, re-pad the vocabulary.

Which parameters are split over TP, and along which dimension, is `megatron.model.utils.tensor_parallel_dim`.
Shard r of p is the r-th of p equal slices along that dimension, so merging is concatenation and splitting
is chunking:

    word_embeddings.weight          [V/p, h]     vocabulary rows r V/p .. (r+1) V/p - 1
    lm_head.bias (BERT)             [V/p]        the same vocabulary entries
    query_key_value.weight, .bias   [3 n d/p, h] rows of heads r n/p .. (r+1) n/p - 1, each head's rows
                                                 ordered [q; k; v] (the [heads, 3, head_dim] layout), so a
                                                 contiguous slice is always whole heads
    self_attention.dense.weight     [h, n d/p]   the input columns of those heads
    dense_h_to_4h.weight, .bias     [f/p, h]     output rows;   dense_4h_to_h.weight [h, f/p]: input columns
                                    with SwiGLU [2 f/p, h]: [this rank's gate slice; its up slice], while
                                    the whole tensor is [gate; up] (`swiglu=True` below)
    output_layer.weight (untied)    [V/p, h]     vocabulary rows, like word_embeddings
    query_key_value with GQA        [(n/G + 2) G d/p, h]: whole query groups (q heads, k head, v head)

Every other tensor is duplicated on all TP ranks; merging checks that the copies agree and keeps rank 0's.

The vocabulary is padded to a multiple of make_vocab_size_divisible_by x TP (`vocab_size_with_padding`);
rows beyond the real vocabulary are padding. Changing TP may change the padded size: `repad_vocab` appends
zero rows or drops padding rows, which leaves the logits of real tokens unchanged.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import Tensor

from megatron.model.utils import tensor_parallel_dim
from megatron.tokenizer import vocab_size_with_padding
from tools.checkpoint.checkpoint_io import ToolError

# Parameters whose dimension 0 is the padded vocabulary.
VOCAB_PADDED_SUFFIXES = ("word_embeddings.weight", "lm_head.bias", "output_layer.weight")
# SwiGLU's fused [gate; up] projection: each shard holds its slice of both halves.
SWIGLU_SUFFIXES = ("mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias")


def _is_swiglu_fused(name: str, swiglu: bool) -> bool:
    return swiglu and any(name == s or name.endswith("." + s) for s in SWIGLU_SUFFIXES)


def _merge_swiglu(tensors: list[Tensor]) -> Tensor:
    """[gate_r; up_r] per shard -> [gate; up] whole."""
    halves = [t.chunk(2, dim=0) for t in tensors]
    return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])


def _split_swiglu(whole: Tensor, tp_size: int) -> list[Tensor]:
    """[gate; up] whole -> [gate_r; up_r] for r = 0 .. tp_size - 1."""
    gate, up = whole.chunk(2, dim=0)
    return [torch.cat([g, u]) for g, u in zip(gate.chunk(tp_size), up.chunk(tp_size))]


def is_vocab_padded(name: str) -> bool:
    """True for the tensors indexed by vocabulary id along dimension 0 (see VOCAB_PADDED_SUFFIXES)."""
    return any(name == suffix or name.endswith("." + suffix) for suffix in VOCAB_PADDED_SUFFIXES)


def merge_shards(shards: list[dict[str, Tensor]], what: str, swiglu: bool = False) -> dict[str, Tensor]:
    """Whole tensors from the p TP shards of `what` (e.g. "model", "optimizer exp_avg"): concatenation
    along `tensor_parallel_dim(name)` for split tensors ([gate; up] halves merged separately when
    `swiglu`), rank 0's copy for duplicated ones.

    Raises ToolError when the shards hold different names or shapes; warns on stderr when duplicated
    copies differ in value (they should be bitwise equal after training) and keeps rank 0's.
    """
    names = list(shards[0])
    for tp_rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != set(names):
            differing = sorted(set(shard) ^ set(names))
            raise ToolError(f"{what}: TP rank {tp_rank} holds different tensors than rank 0: {differing}")
    merged = {}
    for name in names:
        tensors = [shard[name] for shard in shards]
        dim = tensor_parallel_dim(name)
        if _is_swiglu_fused(name, swiglu):
            merged[name] = _merge_swiglu(tensors)
            continue
        if dim is not None:
            merged[name] = torch.cat(tensors, dim=dim)
            continue
        for tp_rank, tensor in enumerate(tensors[1:], start=1):
            if tensor.shape != tensors[0].shape:
                raise ToolError(
                    f"{what}: duplicated tensor {name} has shape {tuple(tensor.shape)} on TP rank {tp_rank} "
                    f"but {tuple(tensors[0].shape)} on rank 0"
                )
            if not torch.equal(tensor, tensors[0]):
                difference = (tensor.float() - tensors[0].float()).abs().max().item()
                print(
                    f"warning: {what}: duplicated tensor {name} differs between TP ranks 0 and {tp_rank} "
                    f"(max abs difference {difference:.3e}); keeping rank 0's",
                    file=sys.stderr,
                )
        merged[name] = tensors[0]
    return merged


def split_whole(whole: dict[str, Tensor], tp_size: int, swiglu: bool = False) -> list[dict[str, Tensor]]:
    """The `tp_size` shards of whole tensors: chunks along `tensor_parallel_dim(name)` ([gate_r; up_r] for
    SwiGLU's fused projection when `swiglu`), copies otherwise.

    Each chunk is cloned so that saving a shard stores only its own slice. Raises ToolError when a split
    dimension is not divisible by `tp_size`.
    """
    shards: list[dict[str, Tensor]] = [{} for _ in range(tp_size)]
    for name, tensor in whole.items():
        dim = tensor_parallel_dim(name)
        if dim is None:
            for shard in shards:
                shard[name] = tensor
            continue
        swiglu_fused = _is_swiglu_fused(name, swiglu)
        if tensor.size(dim) % (2 * tp_size if swiglu_fused else tp_size) != 0:
            raise ToolError(
                f"{name} has size {tensor.size(dim)} along its tensor-parallel dimension {dim}, "
                f"which is not divisible by the target tensor-parallel size {tp_size}"
            )
        chunks = _split_swiglu(tensor, tp_size) if swiglu_fused else torch.chunk(tensor, tp_size, dim=dim)
        for shard, chunk in zip(shards, chunks):
            shard[name] = chunk.clone()
    return shards


def repad_vocab(whole: dict[str, Tensor], padded_vocab_size: int) -> dict[str, Tensor]:
    """Resize dimension 0 of the vocabulary tensors to `padded_vocab_size`: append zero rows, or drop the
    last rows (which must be padding: the caller checks that the real vocabulary fits)."""
    resized = {}
    for name, tensor in whole.items():
        if not is_vocab_padded(name) or tensor.size(0) == padded_vocab_size:
            resized[name] = tensor
        elif tensor.size(0) > padded_vocab_size:
            resized[name] = tensor[:padded_vocab_size].clone()
        else:
            padding = tensor.new_zeros((padded_vocab_size - tensor.size(0), *tensor.shape[1:]))
            resized[name] = torch.cat([tensor, padding], dim=0)
    return resized


def target_padded_vocab_size(
    padded_vocab_size: int,
    divisible_by: int,
    source_tp: int,
    target_tp: int,
    true_vocab_size: Optional[int],
) -> Optional[int]:
    """The padded vocabulary at `target_tp`: vocab_size_with_padding(V, divisible_by, target_tp).

    With the real size V unknown (None), V is only known to lie in (P - m, P] for P = `padded_vocab_size`
    and m = divisible_by x source_tp; the answer is returned when every V in that range pads to the same
    size, None otherwise (the caller must find V). Raises ToolError when a given V does not pad to P at
    `source_tp`, i.e. does not belong to this checkpoint.
    """
    if true_vocab_size is not None:
        expected = vocab_size_with_padding(true_vocab_size, divisible_by, source_tp)
        if expected != padded_vocab_size:
            raise ToolError(
                f"a vocabulary of {true_vocab_size} tokens pads to {expected} at tensor-parallel size "
                f"{source_tp} (make_vocab_size_divisible_by {divisible_by}), but the checkpoint's padded "
                f"vocabulary is {padded_vocab_size}: wrong --true-vocab-size or tokenizer files"
            )
        return vocab_size_with_padding(true_vocab_size, divisible_by, target_tp)
    source_multiple = divisible_by * source_tp
    if padded_vocab_size % source_multiple != 0:
        return None
    lowest = max(1, padded_vocab_size - source_multiple + 1)
    candidates = {vocab_size_with_padding(v, divisible_by, target_tp) for v in (lowest, padded_vocab_size)}
    return candidates.pop() if len(candidates) == 1 else None
