"""Zero-shot GPT evaluation: WikiText perplexity (WIKITEXT103) and LAMBADA cloze accuracy.

    python tasks/main.py --task WIKITEXT103 --valid-data wikitext-103/wiki.test.tokens --load ckpt \\
        --use-checkpoint-args --seq-length 1024 --overlapping-eval 32 --micro-batch-size 8
    torchrun --nproc_per_node 2 tasks/main.py --task LAMBADA --valid-data lambada_test.jsonl --load ckpt \\
        --use-checkpoint-args --tensor-model-parallel-size 2 --strict-lambada --micro-batch-size 8

The data (see tasks/zeroshot_gpt/datasets.py) is read by every rank; the items are shared out over the
data-parallel ranks and the per-rank sums are all-reduced. Tensor-parallel ranks of one model see the
same items: the loss is computed vocab-parallel, and for LAMBADA's argmax the logits are gathered over
the vocabulary (the model is built with parallel_output=False).

Metrics, as Megatron-LM computes and prints them (T = tokenized tokens - 1 = scored targets,
W = WikiText's original token count, see `count_original_tokens`):

    avg loss     = total loss / T                  ppl = exp(avg loss)
    token ratio  = T / (W - 1)            adjusted ppl = exp(avg loss * token ratio) = exp(total / (W - 1))

(each exp capped at exp(20)). The adjusted perplexity is per WikiText token, so models with different
tokenizers can be compared. LAMBADA: an example is correct when the greedy (argmax) prediction is right at
every scored token (see `lambada_tokens`: the passage's final token by default, every token of the last
word with --strict-lambada); accuracy = correct / examples.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor, nn

from megatron.arguments import transformer_config_from_args
from megatron.checkpointing import CheckpointError, load_checkpoint, read_metadata
from megatron.parallel.state import ParallelState, print_rank_0
from megatron.run_state import padded_vocab_size
from megatron.text_generation.loading import build_inference_model, inference_stage
from megatron.tokenizer import AbstractTokenizer
from tasks.eval_utils import model_device, sum_over_dataset
from tasks.zeroshot_gpt.datasets import LambadaDataset, build_wikitext_data, lambada_protocol

MAX_EXP = 20.0  # Megatron caps the exponent of its perplexities


def lm_metrics(total_loss: float, num_tokenized_tokens: int, num_original_tokens: int) -> dict[str, float]:
    """avg loss, ppl, token ratio and adjusted ppl from the summed loss (module docstring)."""
    scored = num_tokenized_tokens - 1
    avg_loss = total_loss / scored
    token_ratio = scored / max(1, num_original_tokens - 1)
    return {
        "avg_loss": avg_loss,
        "ppl": math.exp(min(MAX_EXP, avg_loss)),
        "token_ratio": token_ratio,
        "adjusted_ppl": math.exp(min(MAX_EXP, avg_loss * token_ratio)),
    }


def _inputs(batch: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(tokens, position ids, labels, loss mask) of a batch of items with "text" [b, L+1], "loss_mask" [b, L]."""
    text = batch["text"].to(device)
    tokens, labels = text[:, :-1], text[:, 1:]
    position_ids = torch.arange(tokens.size(1), device=device).expand_as(tokens)
    return tokens, position_ids, labels, batch["loss_mask"].to(device)


def batch_loss_sum(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Sum of the per-token cross entropy over the scored targets of the batch (fp32 scalar)."""
    tokens, position_ids, labels, mask = _inputs(batch, model_device(model))
    losses = model(tokens, position_ids, labels=labels)
    return (losses.float() * mask).sum()


def batch_num_correct(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Number of items whose every scored target is the argmax of the (full-vocabulary) logits."""
    tokens, position_ids, labels, mask = _inputs(batch, model_device(model))
    predicted = model(tokens, position_ids).argmax(dim=-1)
    right = (predicted == labels) | (mask == 0)
    return right.all(dim=1).sum()


def build_model(args: argparse.Namespace, parallel: ParallelState, padded_vocab_size: int) -> nn.Module:
    """The GPT model of the flags with the weights of --load (required by tasks/main.py), in eval mode;
    under PP this rank's stage in a PipelinedGPT, which returns the full logits on every stage."""
    if read_metadata(args.load) is None:
        raise CheckpointError(f"--load {args.load}: no checkpoint there (latest_checkpointed_iteration.txt)")
    config = transformer_config_from_args(args, padded_vocab_size)
    model = build_inference_model(config, args, parallel).to(dtype=args.params_dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    run_args = argparse.Namespace(**dict(vars(args), padded_vocab_size=padded_vocab_size))
    load_checkpoint(
        inference_stage(model), None, None, args.load, parallel, no_load_optim=True, no_load_rng=True,
        run_args=run_args,
    )  # fmt: skip
    return model.eval()


@torch.no_grad()
def evaluate_wikitext(
    args: argparse.Namespace, parallel: ParallelState, tokenizer: AbstractTokenizer, model: nn.Module
) -> dict[str, float]:
    """Perplexity of `model` on the WikiText file --valid-data; prints and returns the metrics."""
    path = args.valid_data[0]
    data = build_wikitext_data(path, tokenizer, args.seq_length, args.overlapping_eval)
    print_rank_0(
        parallel,
        f"> {path}: {data.num_original_tokens} original tokens, {data.num_tokenized_tokens} tokens after "
        f"detokenizing and tokenizing, {len(data.windows)} windows of {args.seq_length} "
        f"(stride --overlapping-eval {args.overlapping_eval})",
    )
    total = sum_over_dataset(data.windows, batch_loss_sum, model, args.eval_micro_batch_size, parallel)
    metrics = lm_metrics(total, data.num_tokenized_tokens, data.num_original_tokens)
    metrics.update(
        total_loss=total,
        num_tokenized_tokens=data.num_tokenized_tokens,
        num_original_tokens=data.num_original_tokens,
    )
    print_rank_0(
        parallel,
        f" validation results on {args.task} | avg loss: {metrics['avg_loss']:.4E} | "
        f"ppl: {metrics['ppl']:.4E} | adjusted ppl: {metrics['adjusted_ppl']:.4E} | "
        f"token ratio: {metrics['token_ratio']:.4f} |",
    )
    return metrics


@torch.no_grad()
def evaluate_lambada(
    args: argparse.Namespace, parallel: ParallelState, tokenizer: AbstractTokenizer, model: nn.Module
) -> dict[str, float]:
    """Cloze accuracy of `model` on the LAMBADA JSONL file --valid-data; prints and returns it."""
    dataset = LambadaDataset(args.valid_data[0], tokenizer, args.seq_length, args.strict_lambada)
    correct = sum_over_dataset(dataset, batch_num_correct, model, args.eval_micro_batch_size, parallel)
    protocol = lambada_protocol(args.strict_lambada)
    accuracy = correct / len(dataset)
    print_rank_0(
        parallel,
        f" validation results on {args.task} | protocol: {protocol} | number correct: {int(correct)} | "
        f"total examples: {len(dataset)} | avg accuracy: {accuracy:.4f} |",
    )
    return {"num_correct": int(correct), "num_examples": len(dataset), "accuracy": accuracy}


def main(args: argparse.Namespace, parallel: ParallelState, tokenizer: AbstractTokenizer) -> dict[str, float]:
    """Run --task WIKITEXT103 or LAMBADA on --valid-data with the model in --load."""
    model = build_model(args, parallel, padded_vocab_size(tokenizer, args))
    if args.task == "WIKITEXT103":
        return evaluate_wikitext(args, parallel, tokenizer, model)
    return evaluate_lambada(args, parallel, tokenizer, model)
