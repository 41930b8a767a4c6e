"""Zero-shot evaluation data: sliding windows over one long text (perplexity) and LAMBADA cloze examples.

Every item is a dict with
    "text":      int64 [seq_length + 1]   tokens; inputs are text[:-1], targets text[1:]
    "loss_mask": float [seq_length]       1 where the target at that position is scored
Short items are padded with the tokenizer's end-of-document id, which is never scored.

Sliding windows (WIKITEXT103). With tokens t_0 .. t_{N-1}, sequence length L and stride k
(--overlapping-eval), window w starts at token w*k and predicts targets t_{w*k+1} .. t_{w*k+L}.
Window 0 scores all its L targets; window w > 0 scores only its last k targets, t_{w*k+L-k+1} ..
t_{w*k+L}, which window w-1 did not reach. So each of t_1 .. t_{N-1} is scored exactly once, always
with at least L - k tokens of context (except near the start), and there are
1 + ceil(max(0, N - 1 - L) / k) windows. t_0 has no context and is never scored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from megatron.tokenizer import AbstractTokenizer
from tasks.data_utils import TaskError
from tasks.zeroshot_gpt.detokenizer import wikitext_detokenize


def num_windows(num_tokens: int, seq_length: int, stride: int) -> int:
    """Windows needed to score targets t_1 .. t_{num_tokens-1} (module docstring)."""
    return 1 + math.ceil(max(0, num_tokens - 1 - seq_length) / stride)


def _item(tokens: list[int], scored: list[bool], seq_length: int, pad_id: int) -> dict[str, Tensor]:
    """Pad `tokens` (at most seq_length + 1) and the per-target `scored` flags to full length."""
    missing = seq_length + 1 - len(tokens)
    text = torch.tensor(tokens + [pad_id] * missing, dtype=torch.long)
    mask = torch.tensor(scored + [False] * (seq_length - len(scored)), dtype=torch.float32)
    return {"text": text, "loss_mask": mask}


class SlidingWindowDataset(Dataset):
    """Overlapping windows over `tokens` that together score every target exactly once."""

    def __init__(self, tokens: list[int], seq_length: int, stride: int, pad_id: int) -> None:
        if not 1 <= stride <= seq_length:
            raise ValueError(f"--overlapping-eval {stride} must be between 1 and --seq-length {seq_length}")
        if len(tokens) < 2:
            raise ValueError(f"need at least 2 tokens to score a next-token prediction, got {len(tokens)}")
        self.tokens = tokens
        self.seq_length = seq_length
        self.stride = stride
        self.pad_id = pad_id

    def __len__(self) -> int:
        return num_windows(len(self.tokens), self.seq_length, self.stride)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        start = index * self.stride
        window = self.tokens[start : start + self.seq_length + 1]
        num_targets = len(window) - 1
        first_scored = 0 if index == 0 else self.seq_length - self.stride
        scored = [position >= first_scored for position in range(num_targets)]
        return _item(window, scored, self.seq_length, self.pad_id)


@dataclass
class WikitextData:
    """A WikiText file ready for scoring: its windows and the two token counts the metrics need."""

    windows: SlidingWindowDataset
    num_tokenized_tokens: int  # N, tokens of the detokenized text under the model's tokenizer
    num_original_tokens: int  # WikiText's own tokens: the raw text split on single spaces


def count_original_tokens(raw_text: str) -> int:
    """WikiText's token count as Megatron-LM takes it: `len(raw_text.strip().split(" "))`.

    Splitting on single spaces makes each line break of the `.tokens` layout (" \\n ") a token of its
    own, which stands for WikiText's end-of-line token: the WikiText-2/103 test file gives 245,566
    (WikiText's published count, with end-of-line tokens, is 245,569).
    """
    return len(raw_text.strip().split(" "))


def build_wikitext_data(
    path: str, tokenizer: AbstractTokenizer, seq_length: int, stride: int
) -> WikitextData:
    """Read a WikiText `.tokens`/`.txt` file, detokenize it, tokenize it as one text, and window it."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"--valid-data {path}: cannot read the file: {e}") from e
    tokens = tokenizer.tokenize(wikitext_detokenize(raw))
    if len(tokens) < 2:
        raise TaskError(f"--valid-data {path}: the file has fewer than 2 tokens to score")
    return WikitextData(
        windows=SlidingWindowDataset(tokens, seq_length, stride, tokenizer.eod),
        num_tokenized_tokens=len(tokens),
        num_original_tokens=count_original_tokens(raw),
    )


def split_last_word(text: str) -> tuple[str, str]:
    """(context, last word): the last whitespace-separated word and the text before it, stripped."""
    words = text.split()
    if len(words) < 2:
        raise ValueError("needs at least two words (a context and a last word)")
    last = words[-1]
    return text[: text.rfind(last)].strip(), last


def lambada_tokens(text: str, tokenizer: AbstractTokenizer, strict: bool) -> tuple[list[int], list[int]]:
    """(context ids, target ids) of one LAMBADA passage, as Megatron-LM's tasks/zeroshot_gpt cuts it.

    default: the whole passage is tokenized once and the target is its final token only (for a last
    word of several tokens, only its last piece is predicted, from context that includes the others).
    strict (--strict-lambada): the target is the last whitespace-separated word, tokenized on its own as
    " " + word; the context is the text before it, stripped, tokenized separately; every token of the
    word must be predicted right.
    """
    context, last = split_last_word(text)
    if strict:
        return tokenizer.tokenize(context), tokenizer.tokenize(" " + last)
    full = tokenizer.tokenize(text)
    return full[:-1], full[-1:]


def lambada_protocol(strict: bool) -> str:
    """The protocol named in the result line."""
    if strict:
        return (
            'strict (--strict-lambada: last word tokenized on its own as " " + word, all its tokens scored)'
        )
    return "default (final token of the tokenized passage scored, as Megatron-LM)"


class LambadaDataset(Dataset):
    """LAMBADA passages from a JSONL file ({"text": ...} per line): the target tokens are scored.

    An example longer than seq_length + 1 tokens loses the start of its context (Megatron-LM has no rule
    for such a passage: its batch would not stack).
    """

    def __init__(self, path: str, tokenizer: AbstractTokenizer, seq_length: int, strict: bool) -> None:
        self.seq_length = seq_length
        self.pad_id = tokenizer.eod
        self.examples: list[tuple[list[int], list[int]]] = []
        try:
            with open(path, encoding="utf-8") as f:
                for line_number, line in enumerate(f, start=1):
                    if line.strip():
                        where = f"{path}:{line_number}"
                        try:
                            context, target = lambada_tokens(_lambada_text(line, where), tokenizer, strict)
                        except ValueError as e:
                            raise TaskError(f"{where}: the text {e}") from None
                        if len(target) > seq_length:
                            raise TaskError(
                                f"{path}:{line_number}: the last word has {len(target)} tokens, more than "
                                f"--seq-length {seq_length}"
                            )
                        self.examples.append((context, target))
        except (OSError, UnicodeDecodeError) as e:
            raise TaskError(f"--valid-data {path}: cannot read the file: {e}") from e
        if not self.examples:
            raise TaskError(f"--valid-data {path}: no examples (the file is empty)")

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        context, target = self.examples[index]
        tokens = (context + target)[-(self.seq_length + 1) :]
        num_context = len(tokens) - len(target)
        # Target j (the prediction made at position j) is tokens[j + 1]: scored for the last word's tokens.
        scored = [j + 1 >= num_context for j in range(len(tokens) - 1)]
        return _item(tokens, scored, self.seq_length, self.pad_id)


def _lambada_text(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise TaskError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise TaskError(f'{where}: expected a JSON object with a string "text"')
    return record["text"]
