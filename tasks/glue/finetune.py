"""GLUE (MNLI, QQP): fine-tune BERT for sentence-pair classification and report accuracy per dev file.

    python tasks/main.py --task MNLI --train-data MNLI/train.tsv \\
        --valid-data MNLI/dev_matched.tsv MNLI/dev_mismatched.tsv --pretrained-checkpoint bert_ckpt \\
        --epochs 5 --tokenizer-type BertWordPieceLowerCase --vocab-file bert-vocab.txt --num-layers 24 \\
        --hidden-size 1024 --num-attention-heads 16 --seq-length 512 --max-position-embeddings 512 \\
        --micro-batch-size 8 --lr 5e-6 --lr-warmup-fraction 0.065 --weight-decay 0.1 --save mnli_ckpt

Data: tasks/glue/data.py; model: tasks.classification.Classification; loop: tasks/finetune_utils.py.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Optional

from torch import nn

from megatron.arguments import transformer_config_from_args
from megatron.parallel.pipeline_layout import StageLayout
from megatron.parallel.state import ParallelState, print_rank_0
from megatron.run_state import RunState
from megatron.tokenizer import AbstractTokenizer
from tasks.classification import Classification
from tasks.finetune_utils import FinetuneTask, finetune
from tasks.glue.data import GLUE_TASKS, GlueDataset, GlueTask


def model_provider(
    glue: GlueTask,
    args: argparse.Namespace,
    parallel: ParallelState,
    run: RunState,
    stage: Optional[StageLayout] = None,
) -> nn.Module:
    """The classifier, or the pipeline stage `stage` of it."""
    config = transformer_config_from_args(args, run.padded_vocab_size)
    return Classification(config, parallel, glue.num_classes, stage=stage)


def main(args: argparse.Namespace, parallel: ParallelState, tokenizer: AbstractTokenizer) -> dict:
    """Fine-tune/evaluate --task MNLI or QQP."""
    glue = GLUE_TASKS[args.task]

    def build_dataset(path: str) -> GlueDataset:
        dataset = GlueDataset(path, glue, tokenizer, args.seq_length)
        if dataset.num_skipped:
            print_rank_0(parallel, f"> {path}: skipped {dataset.num_skipped} rows with an empty text")
        return dataset

    task = FinetuneTask(
        name=glue.name,
        build_dataset=build_dataset,
        model_provider=partial(model_provider, glue),
    )
    return finetune(args, parallel, task, RunState.from_tokenizer(tokenizer, args))
