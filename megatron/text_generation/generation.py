"""Autoregressive generation with a KV cache, identical on every tensor-parallel rank.

The batch of prompts is right-padded into one [batch, max_prompt + max_new_tokens] tensor (as Megatron-LM
does). Generation then runs position by position:

    prefill   one forward pass over positions 0 .. s0 - 1, s0 = the shortest prompt's length, which fills
              the KV cache of every layer (megatron.model.transformer.InferenceParams);
    step t    a forward pass of the single token at position t - 1 (t = s0 + 1, s0 + 2, ...), attending
              over the cache, gives the logits of position t; a row still inside its prompt keeps its
              prompt token at t, any other row takes the token chosen from the logits (sampling.py).

Each row only ever attends to its own earlier positions, and a padding position is overwritten before it
is read, so a row's tokens are those it would get alone. A row is finished after `max_new_tokens`
generated tokens or, with `stop_on_eod`, once it produces the end-of-document token (which is kept, as in
Megatron-LM); the loop ends when every row has finished. Positions after a row's end hold `eod` (0 when
there is none).

Tensor parallelism: the model is built with parallel_output=False, so every TP rank holds the full
logits. TP rank 0 chooses the tokens and broadcasts them over the TP group; all ranks therefore feed
identical tokens to the next step whatever their RNG state and whatever last-bit differences the
reductions may leave in their logits.

Log probabilities, when asked for: log_probs[b, t] = log softmax(z_t)[tokens[b, t + 1]] where z_t are the
logits at position t over the real vocabulary (padding entries excluded, before temperature or filtering).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from megatron.model.transformer import InferenceParams
from megatron.parallel.state import ParallelState
from megatron.text_generation.sampling import SamplingParams, sample


class GenerationError(ValueError):
    """A request the model cannot serve (empty prompt, too long for the position table, bad sizes)."""


@dataclass
class GenerationOutput:
    """tokens [batch, L]: prompts and generated tokens; lengths [batch]: tokens of each row that count
    (prompt + generated, including a final end-of-document token); prompt_lengths [batch];
    log_probs [batch, L - 1] fp32 (see the module docstring) or None; entries beyond a row's length are
    padding."""

    tokens: Tensor
    lengths: Tensor
    prompt_lengths: Tensor
    log_probs: Optional[Tensor]

    def rows(self) -> list[list[int]]:
        """Each row's tokens up to its length."""
        return [row[:length].tolist() for row, length in zip(self.tokens, self.lengths.tolist())]

    def generated(self) -> list[list[int]]:
        """Each row's generated tokens only (after its prompt, up to its length)."""
        return [
            row[p:length].tolist() for row, p, length in zip(self.tokens, self.prompt_lengths, self.lengths)
        ]


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def position_table_size(model: nn.Module) -> Optional[int]:
    """Number of learned positions of a GPTModel (None with ALiBi, which has no position table); a
    pipeline stage (PipelinedGPT) states it, since only the first stage holds the table."""
    if hasattr(model, "position_table_size"):
        return model.position_table_size
    table = model.language_model.embedding.position_embeddings
    return None if table is None else table.num_embeddings


def check_request(
    prompts_tokens: list[list[int]],
    max_new_tokens: int,
    max_sequence_length: Optional[int],
    vocab_size: int,
    sampling: SamplingParams,
) -> None:
    """Raise GenerationError when the request cannot be served: no prompts, an empty prompt, a token id
    outside [0, vocab_size), more than `max_sequence_length` positions (longest prompt + new tokens; None
    means unlimited), or top_k larger than the vocabulary. Needs no model and does no communication."""
    if not prompts_tokens:
        raise GenerationError("no prompts given")
    if max_new_tokens < 0:
        raise GenerationError(f"the number of tokens to generate must be >= 0, got {max_new_tokens}")
    for i, prompt in enumerate(prompts_tokens):
        if not prompt:
            raise GenerationError(f"prompt {i} is empty (it has no tokens; start it with a BOS/EOD token)")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(
                f"prompt {i} holds token ids outside the vocabulary [0, {vocab_size}): {bad[:5]}"
            )
    longest = max(len(p) for p in prompts_tokens)
    if max_sequence_length is not None and longest + max_new_tokens > max_sequence_length:
        raise GenerationError(
            f"prompt of {longest} tokens + {max_new_tokens} tokens to generate = {longest + max_new_tokens} "
            f"positions, more than the model's max_position_embeddings ({max_sequence_length})"
        )
    if sampling.top_k > vocab_size:
        raise GenerationError(f"top_k ({sampling.top_k}) is larger than the vocabulary ({vocab_size})")


def _vocab_logits(logits: Tensor, vocab_size: int) -> Tensor:
    """fp32 logits with the padding entries (ids >= vocab_size, never produced by the tokenizer) at -inf
    (in place when the logits are already fp32)."""
    logits = logits.float()
    if logits.size(-1) > vocab_size:
        logits[..., vocab_size:] = float("-inf")
    return logits


def _broadcast_from_tp_rank0(tokens: Tensor, parallel: ParallelState) -> None:
    """Overwrite `tokens` on every TP rank with TP rank 0's (in place)."""
    if parallel.tp_group is not None and parallel.tp_size > 1:
        dist.broadcast(tokens, src=parallel.tp_src_rank, group=parallel.tp_group)


def _token_log_probs(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] for logits [b, s, V] and targets [b, s] -> [b, s]."""
    return torch.gather(F.log_softmax(logits, dim=-1), -1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts_tokens: list[list[int]],
    max_new_tokens: int,
    parallel: ParallelState,
    sampling: Optional[SamplingParams] = None,
    *,
    vocab_size: int,
    eod: Optional[int] = None,
    stop_on_eod: bool = True,
    seed: Optional[int] = None,
    return_log_probs: bool = False,
    max_sequence_length: Optional[int] = None,
) -> GenerationOutput:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens (module docstring).

    model: a GPTModel in eval mode built with parallel_output=False (full logits on every TP rank).
    sampling: how tokens are chosen (default SamplingParams(): plain sampling at temperature 1).
    vocab_size: the tokenizer's vocabulary (logits beyond it are padding and never chosen).
    eod: the end-of-document id: the padding value, and the stop token when `stop_on_eod`.
    seed: seeds the sampling generator (None: a random seed; only TP rank 0's choice is used).
    max_sequence_length: the most positions a row may reach (default: the model's learned position
    table; unlimited with ALiBi). With max_new_tokens == 0 the prompts are only scored (one forward
    pass, no cache) and `return_log_probs` gives their log probabilities.
    Raises GenerationError for an unusable request, before any communication.
    """
    sampling = sampling if sampling is not None else SamplingParams()
    if getattr(model, "parallel_output", False):
        raise ValueError("generate() needs the full logits: build the GPTModel with parallel_output=False")
    if max_sequence_length is None:
        max_sequence_length = position_table_size(model)
    check_request(prompts_tokens, max_new_tokens, max_sequence_length, vocab_size, sampling)
    device = model_device(model)
    batch = len(prompts_tokens)
    prompt_lengths = torch.tensor([len(p) for p in prompts_tokens], device=device)
    total = int(prompt_lengths.max()) + max_new_tokens
    pad = eod if eod is not None else 0
    tokens = torch.full((batch, total), pad, dtype=torch.long, device=device)
    for row, prompt in enumerate(prompts_tokens):
        tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
    positions = torch.arange(total, device=device).expand(batch, total)
    log_probs = torch.zeros(batch, total - 1, device=device) if return_log_probs else None

    if max_new_tokens == 0:  # scoring only
        if log_probs is not None:
            logits = _vocab_logits(model(tokens, positions), vocab_size)
            log_probs = _token_log_probs(logits[:, :-1], tokens[:, 1:])
        return GenerationOutput(tokens, prompt_lengths.clone(), prompt_lengths, log_probs)

    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    cache = InferenceParams(max_batch_size=batch, max_sequence_length=total)
    lengths = prompt_lengths + max_new_tokens  # shortened for rows that stop at the end-of-document token
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    start, end = 0, int(prompt_lengths.min())  # the forward pass covers positions start .. end - 1
    while True:
        logits = model(tokens[:, start:end], positions[:, start:end], inference_params=cache)
        logits = _vocab_logits(logits, vocab_size)
        chosen = sample(logits[:, -1], sampling, generator)
        _broadcast_from_tp_rank0(chosen, parallel)
        generating = (prompt_lengths <= end) & ~done  # rows whose token at position `end` is new
        tokens[:, end] = torch.where(generating, chosen, tokens[:, end])
        if log_probs is not None:
            log_probs[:, start:end] = _token_log_probs(logits, tokens[:, start + 1 : end + 1])
        finished = generating & (end + 1 - prompt_lengths >= max_new_tokens)
        if stop_on_eod and eod is not None:
            finished |= generating & (chosen == eod)
        lengths = torch.where(finished, end + 1, lengths)
        done |= finished
        if bool(done.all()):
            break
        start, end = end, end + 1
    final = int(lengths.max())
    return GenerationOutput(
        tokens[:, :final], lengths, prompt_lengths, None if log_probs is None else log_probs[:, : final - 1]
    )
