"""Which transformer layers each pipeline stage (and each virtual chunk of a stage) owns.

Even split: with L layers and p stages, stage s owns layers s L/p .. (s+1) L/p - 1. Uneven split
(Megatron's --decoder-first-pipeline-num-layers F / --decoder-last-pipeline-num-layers T): the first stage
owns F layers, the last T, and the stages in between share the rest equally (a stage whose count is not
given gets (L - F - T) / (number of such stages)).

Interleaved (virtual) stages: with v chunks per stage the model is cut into p v chunks of L / (p v)
layers; chunk c of stage s holds model chunk k = c p + s, i.e. layers k L/(p v) .. (k+1) L/(p v) - 1. A
microbatch therefore visits stage 0, 1, .., p-1, then stage 0 again for its next chunk, and so on.

The first chunk of the first stage holds the embedding ("pre-process"); the last chunk of the last stage
holds the final layernorm, the output layer and the loss ("post-process"). Layers keep their GLOBAL
number (for initialisation and the KV cache), so the weights of a layer do not depend on the layout.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class StageLayout:
    """One model chunk: the global numbers of its layers and whether it holds the input/output ends."""

    layers: range
    pre_process: bool = True
    post_process: bool = True

    @staticmethod
    def whole(num_layers: int) -> StageLayout:
        """The whole model in one chunk (no pipelining)."""
        return StageLayout(range(num_layers), True, True)


def layers_per_stage(
    num_layers: int, pp_size: int, first: Optional[int] = None, last: Optional[int] = None
) -> list[int]:
    """Number of layers of each stage (see the module docstring); ValueError naming the flags if impossible."""
    if pp_size > num_layers:
        raise ValueError(
            f"--pipeline-model-parallel-size {pp_size} is larger than --num-layers {num_layers}: every stage needs "
            "at least one layer"
        )
    fixed = {0: first, pp_size - 1: last} if pp_size > 1 else {}
    fixed = {stage: n for stage, n in fixed.items() if n is not None}
    for stage, n in fixed.items():
        flag = "--decoder-first-pipeline-num-layers" if stage == 0 else "--decoder-last-pipeline-num-layers"
        if n < 1:
            raise ValueError(f"{flag} must be >= 1, got {n}")
    rest_layers = num_layers - sum(fixed.values())
    rest_stages = pp_size - len(fixed)
    if rest_stages == 0 and rest_layers != 0 or rest_layers < rest_stages:
        raise ValueError(
            f"--decoder-first-pipeline-num-layers {first} and --decoder-last-pipeline-num-layers {last} leave "
            f"{rest_layers} of --num-layers {num_layers} for the other {rest_stages} stage(s) of "
            f"--pipeline-model-parallel-size {pp_size}"
        )
    if rest_stages and rest_layers % rest_stages != 0:
        what = "--num-layers" if not fixed else "the layers left after the uneven first/last stages"
        raise ValueError(
            f"{what} ({rest_layers}) is not divisible by the {rest_stages} pipeline stages of "
            f"--pipeline-model-parallel-size {pp_size}; give --decoder-first-pipeline-num-layers / "
            "--decoder-last-pipeline-num-layers for an uneven split"
        )
    even = rest_layers // rest_stages if rest_stages else 0
    return [fixed.get(stage, even) for stage in range(pp_size)]


def stage_layouts(
    num_layers: int,
    pp_size: int,
    vp_size: int = 1,
    first: Optional[int] = None,
    last: Optional[int] = None,
) -> list[list[StageLayout]]:
    """layouts[stage][chunk] for every stage of the pipeline and every virtual chunk of a stage."""
    if vp_size > 1:
        if first is not None or last is not None:
            raise ValueError(
                "--decoder-first/last-pipeline-num-layers cannot be combined with "
                "--virtual-pipeline-model-parallel-size / --num-layers-per-virtual-pipeline-stage"
            )
        if pp_size < 2:
            raise ValueError(
                "--virtual-pipeline-model-parallel-size needs --pipeline-model-parallel-size > 1"
            )
        if num_layers % (pp_size * vp_size) != 0:
            raise ValueError(
                f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp_size} x "
                f"virtual stages {vp_size} (--virtual-pipeline-model-parallel-size or "
                "--num-layers-per-virtual-pipeline-stage)"
            )
        n = num_layers // (pp_size * vp_size)
        chunks = [range(k * n, (k + 1) * n) for k in range(pp_size * vp_size)]
    else:
        counts = layers_per_stage(num_layers, pp_size, first, last)
        starts = [sum(counts[:s]) for s in range(pp_size)]
        chunks = [range(start, start + count) for start, count in zip(starts, counts)]
    last_chunk = len(chunks) - 1
    return [
        [
            StageLayout(chunks[c * pp_size + s], c * pp_size + s == 0, c * pp_size + s == last_chunk)
            for c in range(vp_size)
        ]
        for s in range(pp_size)
    ]


def virtual_pipeline_size(args: argparse.Namespace) -> int:
    """v from --virtual-pipeline-model-parallel-size or --num-layers-per-virtual-pipeline-stage N
    (v = L / (p N), Megatron's classic flag; both may be given if they agree); 1 without either."""
    vp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    per_stage = getattr(args, "num_layers_per_virtual_pipeline_stage", None)
    if per_stage is not None:
        layers_per_pp_stage = args.num_layers // args.pipeline_model_parallel_size
        if (
            per_stage < 1
            or args.num_layers % args.pipeline_model_parallel_size
            or layers_per_pp_stage % per_stage
        ):
            raise ValueError(
                f"--num-layers {args.num_layers} / --pipeline-model-parallel-size "
                f"{args.pipeline_model_parallel_size} is not a multiple of --num-layers-per-virtual-pipeline-stage "
                f"{per_stage}"
            )
        if vp is not None and vp != layers_per_pp_stage // per_stage:
            raise ValueError(
                f"--virtual-pipeline-model-parallel-size {vp} disagrees with --num-layers-per-virtual-pipeline-stage "
                f"{per_stage} ({layers_per_pp_stage // per_stage} virtual stages); give one of them"
            )
        return layers_per_pp_stage // per_stage
    if vp is not None and vp < 1:
        raise ValueError(f"--virtual-pipeline-model-parallel-size must be >= 1, got {vp}")
    return vp or 1


def check_pipeline_args(args: argparse.Namespace, num_microbatches: int) -> None:
    """Validate the pipeline flags against --num-layers and the number of microbatches (ValueError naming
    the flags); sets args.virtual_pipeline_model_parallel_size to v (None when 1, as Megatron)."""
    vp = virtual_pipeline_size(args)
    pp = args.pipeline_model_parallel_size
    first = getattr(args, "decoder_first_pipeline_num_layers", None)
    last = getattr(args, "decoder_last_pipeline_num_layers", None)
    if pp == 1 and (first is not None or last is not None):
        raise ValueError("--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
    stage_layouts(args.num_layers, pp, vp, first, last)
    if vp > 1 and num_microbatches % pp != 0:
        raise ValueError(
            f"the interleaved schedule needs the number of microbatches ({num_microbatches} = "
            f"--global-batch-size / (--micro-batch-size x data-parallel size)) to be a multiple of "
            f"--pipeline-model-parallel-size {pp}"
        )
    args.virtual_pipeline_model_parallel_size = vp if vp > 1 else None


_LAYER_KEY = re.compile(r"^(language_model\.encoder\.layers\.)(\d+)(\..*)$")
_TIED_KEY = "language_model.embedding.word_embeddings.weight"
_HEAD_KEY = "word_embeddings_for_head.weight"


def global_key(local_key: str, stage: StageLayout) -> str:
    """The whole-model state-dict key of a stage's key: layers.i -> layers.(first layer + i); the last
    stage's word_embeddings_for_head is the tied word embedding."""
    if local_key == _HEAD_KEY:
        return _TIED_KEY
    match = _LAYER_KEY.match(local_key)
    if match is None:
        return local_key
    return f"{match.group(1)}{stage.layers[int(match.group(2))]}{match.group(3)}"
