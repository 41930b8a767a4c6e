"""Pretrain GPT: the model provider, the batch function and the loss; megatron.training does the rest.

torchrun --nproc_per_node 2 pretrain_gpt.py --tensor-model-parallel-size 2 --num-layers 12 ...
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from functools import partial
from typing import Optional

import torch
from torch import Tensor, nn

from megatron.arguments import transformer_config_from_args
from megatron.batch_utils import get_ltor_masks_and_position_ids
from megatron.data.gpt_dataset import build_train_valid_test_datasets
from megatron.data.mock_dataset import MockGPTDataset
from megatron.model import GPTModel
from megatron.parallel.pipeline_layout import StageLayout
from megatron.parallel.state import ParallelState
from megatron.run_state import RunState
from megatron.tokenizer import build_tokenizer
from megatron.training import pretrain


def model_provider(
    args: argparse.Namespace, parallel: ParallelState, run: RunState, stage: Optional[StageLayout] = None
) -> nn.Module:
    """The whole GPT, or the pipeline stage `stage` of it."""
    config = transformer_config_from_args(args, run.padded_vocab_size)
    return GPTModel(config, parallel, parallel_output=True, stage=stage)


def get_batch(data_iterator: Iterator, args: argparse.Namespace, eod_token: int) -> tuple[Tensor, ...]:
    """tokens = sample[:-1], labels = sample[1:], with Megatron's masks and position ids."""
    data = next(data_iterator)["text"].long()
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    data = data.to(device)
    tokens, labels = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    attention_mask, loss_mask, position_ids = get_ltor_masks_and_position_ids(
        tokens, eod_token, args.reset_position_ids, args.reset_attention_mask, args.eod_mask_loss
    )
    return tokens, labels, loss_mask, attention_mask, position_ids


def loss_func(loss_mask: Tensor, output: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token losses averaged over the loss mask."""
    loss = torch.sum(output.float().view(-1) * loss_mask.view(-1)) / loss_mask.sum().clamp(min=1.0)
    return loss, {"lm loss": loss.detach()}


def forward_step(
    data_iterator: Iterator,
    model: nn.Module,
    args: argparse.Namespace,
    parallel: ParallelState,
    *,
    run: RunState,
):
    tokens, labels, loss_mask, attention_mask, position_ids = get_batch(data_iterator, args, run.eod_token)
    output = model(tokens, position_ids, attention_mask, labels=labels)
    return output, partial(loss_func, loss_mask)


def train_valid_test_datasets_provider(num_samples: list[int], args: argparse.Namespace) -> tuple:
    if args.mock_data:
        tokenizer = build_tokenizer(args)
        return tuple(
            MockGPTDataset(n, args.seq_length, tokenizer.vocab_size, args.seed + i) if n > 0 else None
            for i, n in enumerate(num_samples)
        )
    return build_train_valid_test_datasets(
        args.data_path, args.split, tuple(num_samples), args.seq_length, args.seed, args.data_cache_path
    )


def main(argv: list[str] | None = None) -> dict:
    return pretrain(
        train_valid_test_datasets_provider,
        model_provider,
        forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        argv=argv,
    )


if __name__ == "__main__":
    main()
