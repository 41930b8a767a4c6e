"""Merge the pipeline stages of one tensor-parallel rank into the whole model, and split it again.

A pipeline-parallel checkpoint holds, per TP rank, one file per stage (`mp_rank_TT_PPP`): stage s has the
layers megatron.parallel.pipeline_layout assigns to it, numbered from 0 (`layers.0` of stage 1 is global
layer L/p when the split is even), the first stage the embedding, the last the final layernorm and heads
and, when it is not also the first, `word_embeddings_for_head` (the copy of the tied word embedding,
equal to the first stage's). Interleaved stages store their v chunks as `model0` .. `model{v-1}`.

Merging renumbers every stage's layers globally and drops the head copy; splitting does the inverse for
an even split over the target number of stages. The model dicts here are flat (`state_dict()` keys).
Impossible layouts and inconsistent files raise ValueError with the reason; the tools report it.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

import torch
from torch import Tensor

from megatron.checkpoint_format import from_megatron_state_dict
from megatron.parallel.pipeline_layout import StageLayout, global_key, stage_layouts

HEAD_KEY = "word_embeddings_for_head.weight"
TIED_KEY = "language_model.embedding.word_embeddings.weight"
_LAYER_KEY = re.compile(r"^language_model\.encoder\.layers\.(\d+)\.(.*)$")


def saved_layouts(args: argparse.Namespace) -> list[list[StageLayout]]:
    """layouts[stage][chunk] of the checkpoint whose saved args are `args`."""
    try:
        return stage_layouts(
            args.num_layers,
            getattr(args, "pipeline_model_parallel_size", 1),
            getattr(args, "virtual_pipeline_model_parallel_size", None) or 1,
            getattr(args, "decoder_first_pipeline_num_layers", None),
            getattr(args, "decoder_last_pipeline_num_layers", None),
        )
    except ValueError as e:
        raise ValueError(f"the checkpoint's args describe an impossible pipeline split: {e}") from None


def merge_stages(
    stage_files: list[dict[str, Any]], args: argparse.Namespace, where: str
) -> dict[str, Tensor]:
    """The whole model (flat, global layer numbers) of one TP rank from its stages' files, stage 0 first.

    ValueError when the head copy of the tied embedding differs from the first stage's embedding (the
    copies are kept bitwise equal by training) or a stage misses its chunks."""
    layouts = saved_layouts(args)
    if len(layouts) != len(stage_files):
        raise ValueError(f"{where}: {len(stage_files)} pipeline stage dirs, but the args say {len(layouts)}")
    whole: dict[str, Tensor] = {}
    head = None
    for stage, (chunks, state) in enumerate(zip(layouts, stage_files)):
        for index, layout in enumerate(chunks):
            key = "model" if len(chunks) == 1 else f"model{index}"
            if key not in state:
                raise ValueError(
                    f"{where}: stage {stage} holds no '{key}' (expected {len(chunks)} model chunks)"
                )
            for name, tensor in from_megatron_state_dict(state[key]).items():
                if name == HEAD_KEY:
                    head = tensor
                else:
                    whole[global_key(name, layout)] = tensor
    if head is not None and not torch.equal(head, whole[TIED_KEY]):
        raise ValueError(
            f"{where}: the last stage's word_embeddings_for_head differs from the first stage's word embeddings"
        )
    return whole


def split_stages(
    whole: dict[str, Tensor],
    num_layers: int,
    pp_size: int,
    flag: str = "--target-pipeline-model-parallel-size",
) -> list[dict[str, Tensor]]:
    """The flat model of each of `pp_size` even stages (local layer numbers; the last stage gets the head
    copy of the tied embedding when it is not also the first). `flag` names pp_size in errors."""
    try:
        layouts = [chunks[0] for chunks in stage_layouts(num_layers, pp_size)]
    except ValueError as e:
        raise ValueError(f"{flag} {pp_size}: {e}") from None
    stages: list[dict[str, Tensor]] = [{} for _ in layouts]
    for name, tensor in whole.items():
        match = _LAYER_KEY.match(name)
        for stage, layout in zip(stages, layouts):
            if match is not None and int(match.group(1)) in layout.layers:
                number = int(match.group(1)) - layout.layers.start
                stage[f"language_model.encoder.layers.{number}.{match.group(2)}"] = tensor
            elif match is None and name.startswith("language_model.embedding.") and layout.pre_process:
                stage[name] = tensor
            elif match is None and not name.startswith("language_model.embedding.") and layout.post_process:
                stage[name] = tensor
    if pp_size > 1 and "language_model.output_layer.weight" not in whole:  # tied output layer
        stages[-1][HEAD_KEY] = whole[TIED_KEY]
    return stages
