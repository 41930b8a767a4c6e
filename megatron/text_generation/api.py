"""Text in, text out: tokenize the prompts, generate (generation.py), detokenize, as Megatron-LM's
`generate_and_post_process`.

The response holds, per prompt (Megatron-LM's REST API keys):

    text      the detokenized prompt + generation (including a final end-of-document token's text)
    segments  the same tokens one by one, each detokenized on its own
    logprobs  log p(token t+1 | tokens 0..t) for t = 0 .. length - 2 (None unless asked for)
    tokens    the token ids (prompt_lengths: how many of them are the prompt's)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from megatron.parallel.state import ParallelState
from megatron.text_generation.generation import GenerationError, generate
from megatron.text_generation.sampling import SamplingParams
from megatron.tokenizer import AbstractTokenizer


@dataclass
class GenerationResponse:
    """Per prompt: text, segments, logprobs (or None), tokens, prompt_lengths (see the module docstring)."""

    text: list[str]
    segments: list[list[str]]
    logprobs: Optional[list[list[float]]]
    tokens: list[list[int]]
    prompt_lengths: list[int]


def end_of_document_id(tokenizer: AbstractTokenizer) -> Optional[int]:
    """The tokenizer's end-of-document id, or None when it has none."""
    try:
        return tokenizer.eod
    except NotImplementedError:
        return None


def tokenize_prompts(
    tokenizer: AbstractTokenizer, prompts: list[str], add_bos: bool = False
) -> list[list[int]]:
    """Token ids of each prompt; with `add_bos` each starts with the end-of-document id (Megatron-LM's BOS)."""
    if not add_bos:
        return [tokenizer.tokenize(prompt) for prompt in prompts]
    bos = end_of_document_id(tokenizer)
    if bos is None:
        raise GenerationError(f"add_BOS needs an end-of-document token, which {tokenizer.name} does not have")
    return [[bos, *tokenizer.tokenize(prompt)] for prompt in prompts]


def generate_and_post_process(
    model: nn.Module,
    tokenizer: AbstractTokenizer,
    parallel: ParallelState,
    prompts: list[str],
    tokens_to_generate: int,
    sampling: Optional[SamplingParams] = None,
    *,
    seed: Optional[int] = None,
    add_bos: bool = False,
    return_log_probs: bool = False,
    stop_on_eod: bool = True,
    max_sequence_length: Optional[int] = None,
) -> GenerationResponse:
    """Generate `tokens_to_generate` tokens after each prompt and detokenize (arguments: generation.generate).

    Collective over the TP group: every TP rank calls it with the same arguments. Raises GenerationError
    for an unusable request (on every rank alike, before any communication).
    """
    output = generate(
        model,
        tokenize_prompts(tokenizer, prompts, add_bos),
        tokens_to_generate,
        parallel,
        sampling,
        vocab_size=tokenizer.vocab_size,
        eod=end_of_document_id(tokenizer),
        stop_on_eod=stop_on_eod,
        seed=seed,
        return_log_probs=return_log_probs,
        max_sequence_length=max_sequence_length,
    )
    rows = output.rows()
    logprobs = None
    if output.log_probs is not None:
        logprobs = [values[: len(row) - 1] for values, row in zip(output.log_probs.tolist(), rows)]
    return GenerationResponse(
        text=[tokenizer.detokenize(row) for row in rows],
        segments=[[tokenizer.detokenize([token]) for token in row] for row in rows],
        logprobs=logprobs,
        tokens=rows,
        prompt_lengths=output.prompt_lengths.tolist(),
    )
