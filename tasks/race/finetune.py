"""RACE: fine-tune BERT for 4-way multiple choice and report accuracy on each validation directory.

    python tasks/main.py --task RACE --train-data RACE/train/middle RACE/train/high \\
        --valid-data RACE/dev/middle RACE/dev/high --pretrained-checkpoint bert_ckpt --epochs 3 \\
        --tokenizer-type BertWordPieceLowerCase --vocab-file bert-vocab.txt --num-layers 24 \\
        --hidden-size 1024 --num-attention-heads 16 --seq-length 512 --max-position-embeddings 512 \\
        --micro-batch-size 4 --lr 1e-5 --lr-warmup-fraction 0.06 --weight-decay 0.1 --save race_ckpt

Data: tasks/race/data.py; model: tasks.classification.MultipleChoice; loop: tasks/finetune_utils.py.
"""

from __future__ import annotations

import argparse
from typing import Optional

from torch import nn

from megatron.arguments import transformer_config_from_args
from megatron.parallel.pipeline_layout import StageLayout
from megatron.parallel.state import ParallelState
from megatron.run_state import RunState
from megatron.tokenizer import AbstractTokenizer
from tasks.classification import MultipleChoice
from tasks.finetune_utils import FinetuneTask, finetune
from tasks.race.data import NUM_CHOICES, RaceDataset


def model_provider(
    args: argparse.Namespace, parallel: ParallelState, run: RunState, stage: Optional[StageLayout] = None
) -> nn.Module:
    """The multiple-choice model, or the pipeline stage `stage` of it."""
    return MultipleChoice(transformer_config_from_args(args, run.padded_vocab_size), parallel, stage=stage)


def main(args: argparse.Namespace, parallel: ParallelState, tokenizer: AbstractTokenizer) -> dict:
    task = FinetuneTask(
        name="RACE",
        build_dataset=lambda path: RaceDataset(path, tokenizer, args.seq_length),
        model_provider=model_provider,
        sequences_per_sample=NUM_CHOICES,
    )
    return finetune(args, parallel, task, RunState.from_tokenizer(tokenizer, args))
