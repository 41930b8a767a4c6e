"""Pretrain BERT: masked-LM plus next-sentence (binary) loss; megatron.training does the rest.

torchrun --nproc_per_node 2 pretrain_bert.py --tensor-model-parallel-size 2 --num-layers 12 ...
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from functools import partial
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.arguments import transformer_config_from_args
from megatron.data.bert_dataset import BertMaskingConfig, BertTokenIds, build_train_valid_test_datasets
from megatron.data.mock_dataset import MockBertDataset
from megatron.model import BertModel
from megatron.parallel.pipeline_layout import StageLayout
from megatron.parallel.state import ParallelState
from megatron.run_state import RunState
from megatron.tokenizer import build_tokenizer
from megatron.training import TrainingError, pretrain


def model_provider(
    args: argparse.Namespace, parallel: ParallelState, run: RunState, stage: Optional[StageLayout] = None
) -> nn.Module:
    """The whole BERT, or the pipeline stage `stage` of it."""
    if args.untie_embeddings_and_output_weights:
        raise TrainingError(
            "--untie-embeddings-and-output-weights: BERT's masked-LM head always uses the word embeddings "
            "(as in Megatron-LM); drop the flag"
        )
    config = transformer_config_from_args(args, run.padded_vocab_size)
    config.num_tokentypes = 2
    config.add_binary_head = args.bert_binary_head
    return BertModel(config, parallel, parallel_output=True, stage=stage)


def get_batch(data_iterator: Iterator) -> dict[str, Tensor]:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return {k: v.to(device) for k, v in next(data_iterator).items()}


def loss_func(
    loss_mask: Tensor, sentence_order: Tensor, output: tuple[Tensor, Optional[Tensor]]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Masked-LM loss averaged over the masked positions, plus the binary head's cross entropy."""
    lm_loss_per_token, binary_logits = output
    loss_mask = loss_mask.float()
    lm_loss = torch.sum(lm_loss_per_token.float().view(-1) * loss_mask.view(-1)) / loss_mask.sum().clamp(
        min=1.0
    )
    if binary_logits is None:
        return lm_loss, {"lm loss": lm_loss.detach()}
    sop_loss = F.cross_entropy(binary_logits.float(), sentence_order.view(-1), ignore_index=-1)
    return lm_loss + sop_loss, {"lm loss": lm_loss.detach(), "sop loss": sop_loss.detach()}


def forward_step(
    data_iterator: Iterator,
    model: nn.Module,
    args: argparse.Namespace,
    parallel: ParallelState,
    *,
    run: RunState,
):
    batch = get_batch(data_iterator)
    labels = batch["labels"].clamp(min=0)  # unmasked positions carry -1 and are zeroed by the loss mask
    output = model(batch["text"], batch["padding_mask"], tokentype_ids=batch["types"], lm_labels=labels)
    return output, partial(loss_func, batch["loss_mask"], batch["is_random"])


def _token_ids(tokenizer) -> BertTokenIds:
    """The tokenizer's [CLS]/[SEP]/[MASK]/[PAD] ids (a tokenizer without them, NullTokenizer for mock data,
    gets ids 0..3 reserved) and which word pieces continue a word ("##..."), for whole-word masking."""
    try:
        ids = (tokenizer.cls, tokenizer.sep, tokenizer.mask, tokenizer.pad)
    except (AttributeError, NotImplementedError):
        ids = (None,) * 4
    if any(i is None for i in ids):
        ids = (0, 1, 2, 3)
    is_continuation = np.zeros(tokenizer.vocab_size, dtype=bool)
    try:
        inv_vocab = tokenizer.inv_vocab
    except NotImplementedError:  # NullTokenizer: ids without strings, every token a word
        inv_vocab = {}
    for token_id, token in inv_vocab.items():
        if token.startswith("##") and token_id < tokenizer.vocab_size:
            is_continuation[token_id] = True
    return BertTokenIds(*ids, vocab_size=tokenizer.vocab_size, is_continuation=is_continuation)


def train_valid_test_datasets_provider(num_samples: list[int], args: argparse.Namespace) -> tuple:
    token_ids = _token_ids(build_tokenizer(args))
    config = BertMaskingConfig(args.seq_length, args.mask_prob, args.short_seq_prob, args.bert_binary_head)
    if args.mock_data:
        first_regular = max(token_ids.cls_id, token_ids.sep_id, token_ids.mask_id, token_ids.pad_id) + 1
        return tuple(
            MockBertDataset(n, args.seed + i, token_ids, config, min_regular_id=first_regular)
            if n > 0
            else None
            for i, n in enumerate(num_samples)
        )
    return build_train_valid_test_datasets(
        args.data_path, args.split, tuple(num_samples), args.seed, token_ids, config, args.data_cache_path
    )


def main(argv: list[str] | None = None) -> dict:
    return pretrain(
        train_valid_test_datasets_provider,
        model_provider,
        forward_step,
        args_defaults={"tokenizer_type": "BertWordPieceLowerCase"},
        argv=argv,
    )


if __name__ == "__main__":
    main()
