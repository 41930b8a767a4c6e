"""Reshape a checkpoint to another tensor-parallel (TP) x pipeline-parallel (PP) layout: merge shards and
stages, re-pad the vocabulary, split.

    python tools/checkpoint/reshard.py --load ckpt_tp2 --save ckpt_tp1 --target-tensor-model-parallel-size 1
    python tools/checkpoint/reshard.py --load ckpt_tp2_pp2 --save ckpt_tp1_pp4 \
        --target-tensor-model-parallel-size 1 --target-pipeline-model-parallel-size 4

Pipeline stages are merged into the whole model on reading and split evenly on writing
(tools/checkpoint/pp_layout.py): each target stage `mp_rank_TT_PPP` holds its layers numbered from 0, and
the last one the copy of the tied word embedding (`word_embeddings_for_head`). Any source layout is read
(uneven first/last stages, interleaved chunks `model0`..); the target is an even split without virtual
stages.

The output is a complete checkpoint for `--tensor-model-parallel-size N --pipeline-model-parallel-size P`
training or evaluation: the tracker, the same iteration (or release) dir, and one
`mp_rank_XX/model_optim_rng.pt` (`mp_rank_XX_YYY` for P > 1) per target rank and stage holding

* `model`: each parameter merged and split along its TP dimension (tools/checkpoint/tp_layout.py); the
  vocabulary rows re-padded to a multiple of make_vocab_size_divisible_by x N, the size training at TP=N
  computes from the tokenizer (zero rows appended, or padding rows dropped);
* `args`: the saved args with tensor_model_parallel_size = N, pipeline_model_parallel_size = P, no
  virtual or uneven stages, and the new padded_vocab_size;
* `optimizer`: None by default (continue training with --no-load-optim); with --keep-optimizer the state
  of the plain or of the distributed optimizer (fp32 main params, moments, step, hyperparameters, fp16
  loss scaler) carried to any N x P: the source stages' states are merged into the whole model's as a
  PP 1 run would hold it (pp_optimizer.py; the head copy of the tied embedding is dropped), resharded over
  TP like the parameters (optimizer_state.py; vocabulary re-padded, SwiGLU and GQA layouts kept), and
  split into the target stages, each numbered and grouped as its own optimizer does, the last stage's
  `word_embeddings_for_head` getting the word embedding's state (what training holds there). The
  distributed optimizer's per-parameter state goes to `distrib_optim.pt` beside each target file. A
  resumed run continues the loss curve of the uninterrupted one (tests/test_reshard_optimizer_pp.py);
* `opt_param_scheduler`, `iteration`, `checkpoint_version`: copied;
* `rng_state`: target stage p takes source stage p's file (stage 0's when the source has fewer stages);
  target TP rank r < source size keeps source rank r's states; a new rank r gets rank 0's
  python/numpy/torch states (identical on all TP ranks) and a fresh 'model-parallel-rng' stream seeded
  seed + 2718 + r, as training seeds TP rank r. (When the source holds CUDA generator states and this
  machine has no CUDA, the new streams cannot be made: rng_state is then dropped, load with --no-load-rng.)
  (Dropout masks depend on the layout anyway: compare runs across layouts with dropout off.)

The real vocabulary size, needed when the padded size changes, is taken from --true-vocab-size, or deduced
when every size consistent with the source padding pads alike, or read from the tokenizer the saved args
name. The output folder is built under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any, Optional

import torch
from torch import Tensor

from megatron.optimizer.distrib_optim import DISTRIB_OPTIM_FILENAME
from megatron.parallel.random import MODEL_PARALLEL_RNG, TP_SEED_OFFSET, RNGStatesTracker
from megatron.tokenizer import build_tokenizer
from tools.checkpoint.checkpoint_io import (
    LoadedCheckpoint,
    ToolError,
    atomic_output_dir,
    check_distinct_paths,
    load_checkpoint_shards,
    shard_file_state,
    write_checkpoint,
)
from tools.checkpoint.optimizer_state import (
    is_distributed_optimizer_state,
    reshard_distrib_optim,
    reshard_optimizer,
    reshard_shared_state,
)
from tools.checkpoint.pp_layout import split_stages
from tools.checkpoint.pp_optimizer import (
    merge_stage_distrib,
    merge_stage_optimizers,
    merge_stage_shared,
    shared_groups,
    split_shared,
    split_stage_distrib,
    split_stage_optimizer,
)
from tools.checkpoint.tp_layout import merge_shards, repad_vocab, split_whole, target_padded_vocab_size


def get_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--load", required=True, help="Checkpoint folder to read (with its tracker file).")
    parser.add_argument("--save", required=True, help="New checkpoint folder to write (must not exist).")
    parser.add_argument(
        "--target-tensor-model-parallel-size", type=int, required=True, help="TP size of the output."
    )
    parser.add_argument(
        "--target-pipeline-model-parallel-size",
        type=int,
        default=1,
        help="PP size of the output (even split).",
    )
    parser.add_argument(
        "--keep-optimizer",
        action="store_true",
        help="Reshard the optimizer state too, plain or distributed (distrib_optim.pt), across any TP x PP "
        "change (default: drop it; load the output with --no-load-optim).",
    )
    parser.add_argument(
        "--true-vocab-size",
        type=int,
        default=None,
        help="The tokenizer's vocabulary size, when the padded vocabulary must change and the tokenizer "
        "files named in the checkpoint's args are not available.",
    )
    parser.add_argument("--force", action="store_true", help="Replace --save if it exists.")
    args = parser.parse_args(argv)
    if args.target_tensor_model_parallel_size < 1:
        parser.error("--target-tensor-model-parallel-size must be >= 1")
    if args.target_pipeline_model_parallel_size < 1:
        parser.error("--target-pipeline-model-parallel-size must be >= 1")
    if args.true_vocab_size is not None and args.true_vocab_size < 1:
        parser.error("--true-vocab-size must be >= 1")
    return args


def check_target_tp(saved_args: argparse.Namespace, target_tp: int) -> None:
    """ToolError unless the attention heads and the MLP width split evenly over `target_tp` ranks."""
    heads = saved_args.num_attention_heads
    ffn = getattr(saved_args, "ffn_hidden_size", None) or 4 * saved_args.hidden_size
    if heads % target_tp != 0:
        raise ToolError(
            f"--target-tensor-model-parallel-size {target_tp} does not divide the {heads} attention heads"
        )
    groups = getattr(saved_args, "num_query_groups", None)
    if getattr(saved_args, "group_query_attention", False) and groups % target_tp != 0:
        raise ToolError(
            f"--target-tensor-model-parallel-size {target_tp} does not divide the {groups} query groups"
        )
    if ffn % target_tp != 0:
        raise ToolError(
            f"--target-tensor-model-parallel-size {target_tp} does not divide ffn_hidden_size {ffn}"
        )


def resolve_padded_vocab_size(
    saved_args: argparse.Namespace, source_tp: int, target_tp: int, true_vocab_size: Optional[int]
) -> int:
    """The padded vocabulary training at `target_tp` uses (see the module docstring for the sources of V)."""
    padded = saved_args.padded_vocab_size
    divisible_by = getattr(saved_args, "make_vocab_size_divisible_by", 128)
    target = target_padded_vocab_size(padded, divisible_by, source_tp, target_tp, true_vocab_size)
    if target is not None:
        return target
    from_tokenizer = _tokenizer_vocab_size(saved_args)
    if from_tokenizer is None:
        raise ToolError(
            f"the padded vocabulary ({padded}, a multiple of {divisible_by} x {source_tp}) must be re-padded "
            f"for tensor-parallel size {target_tp}, which needs the tokenizer's real vocabulary size: the "
            f"tokenizer named in the checkpoint's args ({getattr(saved_args, 'tokenizer_type', None)}) cannot "
            "be loaded here; pass --true-vocab-size N"
        )
    return target_padded_vocab_size(padded, divisible_by, source_tp, target_tp, from_tokenizer)


def _tokenizer_vocab_size(saved_args: argparse.Namespace) -> Optional[int]:
    """The vocabulary size of the tokenizer the saved args describe, or None if it cannot be built here."""
    if getattr(saved_args, "tokenizer_type", None) is None:
        return None
    try:
        return build_tokenizer(saved_args).vocab_size
    except Exception:  # missing files, unknown type: the caller asks for --true-vocab-size instead
        return None


def reshard_checkpoint(
    checkpoint: LoadedCheckpoint,
    target_tp: int,
    keep_optimizer: bool,
    true_vocab_size: Optional[int],
    target_pp: int = 1,
) -> tuple[list[dict[str, Any]], Optional[list[dict[str, Any]]]]:
    """The file contents of `checkpoint` resharded to `target_tp` x `target_pp` ranks: the model_optim_rng.pt
    of each (TP rank, stage) at index tp_rank * target_pp + stage, and, with `keep_optimizer` and a
    distributed-optimizer checkpoint, {"distrib_optim.pt": content} at the same indices (else None)."""
    saved_args = checkpoint.args
    check_target_tp(saved_args, target_tp)
    padded_vocab_size = resolve_padded_vocab_size(saved_args, checkpoint.tp_size, target_tp, true_vocab_size)
    model_shards = checkpoint.model_shards()
    swiglu = getattr(saved_args, "swiglu", False)
    whole = repad_vocab(merge_shards(model_shards, "model", swiglu), padded_vocab_size)
    new_models = split_whole(whole, target_tp, swiglu)
    try:
        stages = [split_stages(new_models[r], saved_args.num_layers, target_pp) for r in range(target_tp)]
    except ValueError as e:
        raise ToolError(str(e)) from None

    optimizers: list[list[Optional[dict[str, Any]]]] = [[None] * target_pp for _ in range(target_tp)]
    distrib: Optional[list[list[dict[str, Any]]]] = None
    if keep_optimizer:
        optimizers, distrib = reshard_optimizer_states(checkpoint, new_models, stages, padded_vocab_size)

    new_args = copy.copy(saved_args)
    new_args.tensor_model_parallel_size = target_tp
    new_args.pipeline_model_parallel_size = target_pp
    for name in ("virtual_pipeline_model_parallel_size", "decoder_first_pipeline_num_layers",
                 "decoder_last_pipeline_num_layers", "num_layers_per_virtual_pipeline_stage"):  # fmt: skip
        if hasattr(new_args, name):
            setattr(new_args, name, None)  # the output is an even split without virtual stages
    new_args.padded_vocab_size = padded_vocab_size
    seed = getattr(saved_args, "seed", 1234)
    rng_source_stages = [p if p < checkpoint.pp_size else 0 for p in range(target_pp)]
    rng_by_source_stage = {
        stage: reshard_rng_states(
            [f[stage].get("rng_state") for f in checkpoint.stage_files], target_tp, seed
        )
        for stage in set(rng_source_stages)
    }
    rng_states = [rng_by_source_stage[stage] for stage in rng_source_stages]  # [target stage][TP rank]
    scheduler = checkpoint.shards[0].get("opt_param_scheduler")
    iteration = checkpoint.shards[0]["iteration"]
    files = [
        shard_file_state(new_args, iteration, stages[r][p], optimizers[r][p], scheduler, rng_states[p][r])
        for r in range(target_tp)
        for p in range(target_pp)
    ]
    extra = None if distrib is None else [{DISTRIB_OPTIM_FILENAME: d} for per_tp in distrib for d in per_tp]
    return files, extra


def reshard_optimizer_states(
    checkpoint: LoadedCheckpoint,
    new_models: list[dict[str, Tensor]],
    stages: list[list[dict[str, Tensor]]],
    padded_vocab_size: int,
) -> tuple[list[list[dict[str, Any]]], Optional[list[list[dict[str, Any]]]]]:
    """(model_optim_rng.pt "optimizer" of each target TP rank and stage, and distrib_optim.pt's content
    for the distributed optimizer, else None): the source stages' states merged into the whole model's
    (pp_optimizer.py), resharded over TP (optimizer_state.py) and split into the target stages.

    `new_models[r]` is target TP rank r's whole model, `stages[r]` its target stages."""
    args, target_tp = checkpoint.args, len(new_models)
    swiglu, num_layers = getattr(args, "swiglu", False), args.num_layers
    model_shards = checkpoint.model_shards()
    where = [f"{checkpoint.checkpoint_dir} TP rank {r}" for r in range(checkpoint.tp_size)]
    first = checkpoint.stage_files[0][0].get("optimizer")
    if first is None:
        raise ToolError(
            f"--keep-optimizer: {checkpoint.checkpoint_dir} holds no optimizer state; run without it"
        )
    if not is_distributed_optimizer_state(first):
        whole = [
            merge_stage_optimizers(files, args, model_shards[r], where[r])
            for r, files in enumerate(checkpoint.stage_files)
        ]
        new = reshard_optimizer(whole, model_shards, target_tp, padded_vocab_size, swiglu)
        return [
            split_stage_optimizer(new[r], new_models[r], stages[r], num_layers) for r in range(target_tp)
        ], None

    shared = [
        merge_stage_shared(files, args, model_shards[r], where[r])
        for r, files in enumerate(checkpoint.stage_files)
    ]
    new_shared = reshard_shared_state(shared, target_tp)
    optimizers = [
        [
            split_shared(new_shared[r], shared_groups(new_shared[r], new_models[r]), stage, where[0])
            for stage in stages[r]
        ]
        for r in range(target_tp)
    ]
    distrib = [
        merge_stage_distrib(_read_distrib_files(checkpoint, r), files, args, where[r])
        for r, files in enumerate(checkpoint.stage_files)
    ]
    new = reshard_distrib_optim(distrib, model_shards, target_tp, padded_vocab_size, swiglu)
    return optimizers, [split_stage_distrib(new[r], stages[r], num_layers) for r in range(target_tp)]


def _read_distrib_files(checkpoint: LoadedCheckpoint, tp_rank: int) -> list[dict[str, Any]]:
    """The distributed optimizer's distrib_optim.pt of every stage of TP rank `tp_rank`."""
    contents = []
    for pp_rank in range(checkpoint.pp_size):
        path = os.path.join(os.path.dirname(checkpoint.shard_path(tp_rank, pp_rank)), DISTRIB_OPTIM_FILENAME)
        if not os.path.isfile(path):
            raise ToolError(f"--keep-optimizer: {path} not found (the distributed optimizer's state)")
        try:
            contents.append(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as e:  # a truncated or foreign file: say which
            raise ToolError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    return contents


def reshard_rng_states(
    rng_shards: list[Optional[list[dict[str, Any]]]], target_tp: int, seed: int
) -> list[Optional[list[dict[str, Any]]]]:
    """`rng_state` (a list over DP ranks) for each target TP rank; see the module docstring for the rule.

    All None when any source rank has none, or when a new stream would need a CUDA state without CUDA here.
    """
    if any(state is None for state in rng_shards):
        return [None] * target_tp
    new: list[Optional[list[dict[str, Any]]]] = []
    for tp_rank in range(target_tp):
        if tp_rank < len(rng_shards):
            new.append(rng_shards[tp_rank])
            continue
        tracker = RNGStatesTracker()
        tracker.add(MODEL_PARALLEL_RNG, seed + TP_SEED_OFFSET + tp_rank)
        fresh = tracker.get_states()[MODEL_PARALLEL_RNG]
        entries = []
        for entry in rng_shards[0]:
            source_devices = set(entry["rng_tracker_states"].get(MODEL_PARALLEL_RNG, fresh))
            if not source_devices <= set(fresh):
                print(
                    "note: the checkpoint holds CUDA RNG states, which cannot be created without CUDA; "
                    "rng_state dropped: load the output with --no-load-rng",
                    file=sys.stderr,
                )
                return [None] * target_tp
            tracker_states = dict(entry["rng_tracker_states"])
            tracker_states[MODEL_PARALLEL_RNG] = {device: fresh[device] for device in source_devices}
            entries.append({**entry, "rng_tracker_states": tracker_states})
        new.append(entries)
    return new


def main(argv: Optional[list[str]] = None) -> None:
    args = get_args(argv)
    try:
        check_distinct_paths(args.load, args.save, "--load", "--save")
        checkpoint = load_checkpoint_shards(args.load)
        target_tp, target_pp = (
            args.target_tensor_model_parallel_size,
            args.target_pipeline_model_parallel_size,
        )
        shards, extra = reshard_checkpoint(
            checkpoint, target_tp, args.keep_optimizer, args.true_vocab_size, target_pp
        )
        with atomic_output_dir(args.save, args.force, "--save") as temp_dir:
            write_checkpoint(temp_dir, checkpoint.iteration, checkpoint.release, shards, target_pp, extra)
    except (ToolError, OSError) as e:  # OSError: unreadable input, full disk, no permission
        raise SystemExit(f"error: {e}") from None
    what = "release" if checkpoint.release else f"iteration {checkpoint.iteration}"
    old_vocab, new_vocab = checkpoint.args.padded_vocab_size, shards[0]["args"].padded_vocab_size
    print(
        f"resharded {args.load} ({what}) from tensor-parallel {checkpoint.tp_size} x pipeline-parallel "
        f"{checkpoint.pp_size} to {target_tp} x {target_pp} into {args.save}; padded vocabulary "
        f"{old_vocab} -> {new_vocab}"
    )
    if not args.keep_optimizer:
        print("optimizer state dropped: continue training from it with --no-load-optim")


if __name__ == "__main__":
    main()
