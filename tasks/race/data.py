"""RACE reading comprehension as 4-way multiple choice for BERT.

Data layout (the RACE release): a directory such as RACE/train/middle holding one file per passage
(`*.txt`, or `*.json`; subdirectories are searched too, so RACE/train takes high and middle), each a
JSON object

    {"article": "passage ...", "questions": ["q1", ...], "options": [["o1", "o2", "o3", "o4"], ...],
     "answers": ["B", ...], "id": "..."}

(a path to a single such file is accepted too). Every question becomes one sample of 4 sequences, one
per option, built as Megatron-LM builds them:

    qa   = question with its "_" blank(s) replaced by the option, or "question option" without a blank
    ids  = [CLS] qa [SEP] passage [SEP]          (qa cut to 128 tokens; the passage's tail is cut to fit
                                                  --seq-length; see tasks.data_utils.build_pair_input)
    label = "A".."D" -> 0..3

Passage and qa go through `clean_text` before tokenization.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from megatron.tokenizer import AbstractTokenizer
from tasks.data_utils import TaskError, build_pair_input, clean_text

NUM_CHOICES = 4
MAX_QA_LENGTH = 128
ANSWER_LETTERS = "ABCD"


def race_files(path: str) -> list[str]:
    """The passage files under a RACE directory (`*.txt` and `*.json`, recursively, sorted), or [path]."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise TaskError(f"RACE data {path}: no such file or directory")
    files = sorted(
        os.path.join(folder, name)
        for folder, _, names in os.walk(path)
        for name in names
        if name.endswith((".txt", ".json"))
    )
    if not files:
        raise TaskError(f"RACE data {path}: no .txt or .json passage files in the directory")
    return files


def read_passage(path: str) -> dict[str, Any]:
    """Load and check one RACE passage file; TaskError naming the file (and question) when malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"{path}: cannot read the file: {e}") from e
    except json.JSONDecodeError as e:
        raise TaskError(f"{path}: malformed JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(record, dict):
        raise TaskError(f"{path}: expected a JSON object, got {type(record).__name__}")
    for key, kind in (("article", str), ("questions", list), ("options", list), ("answers", list)):
        if not isinstance(record.get(key), kind):
            raise TaskError(f'{path}: "{key}" is missing or not a {kind.__name__}')
    questions, options, answers = record["questions"], record["options"], record["answers"]
    if not len(questions) == len(options) == len(answers):
        raise TaskError(
            f'{path}: "questions", "options" and "answers" differ in length '
            f"({len(questions)}, {len(options)}, {len(answers)})"
        )
    for i, (question, choices, answer) in enumerate(zip(questions, options, answers)):
        if not isinstance(question, str):
            raise TaskError(f"{path}: question {i} is not a string")
        if not (isinstance(choices, list) and len(choices) == NUM_CHOICES):
            raise TaskError(f"{path}: question {i} needs a list of {NUM_CHOICES} options")
        if not all(isinstance(c, str) for c in choices):
            raise TaskError(f"{path}: question {i} has an option that is not a string")
        if answer not in tuple(ANSWER_LETTERS):
            raise TaskError(f"{path}: question {i} has answer {answer!r}; expected one of A, B, C, D")
    return record


def question_with_option(question: str, option: str) -> str:
    """Fill the question's "_" blank(s) with the option, or append the option after a space."""
    return question.replace("_", option) if "_" in question else f"{question} {option}"


class RaceDataset(Dataset):
    """All questions of the passages under `path`: items {"text", "types", "padding_mask": int64
    [4, seq_length], "label": int64 scalar}."""

    def __init__(self, path: str, tokenizer: AbstractTokenizer, seq_length: int) -> None:
        self.name = path
        self.samples: list[dict[str, Tensor]] = []
        special = (tokenizer.cls, tokenizer.sep, tokenizer.pad)
        for file in race_files(path):
            record = read_passage(file)
            passage_ids = tokenizer.tokenize(clean_text(record["article"]))
            for question, choices, answer in zip(record["questions"], record["options"], record["answers"]):
                sequences = []
                for option in choices:
                    qa_ids = tokenizer.tokenize(clean_text(question_with_option(question, option)))
                    sequences.append(
                        build_pair_input(qa_ids[:MAX_QA_LENGTH], passage_ids, seq_length, *special)
                    )
                ids, types, padding = (torch.tensor(column, dtype=torch.long) for column in zip(*sequences))
                label = torch.tensor(ANSWER_LETTERS.index(answer), dtype=torch.long)
                self.samples.append({"text": ids, "types": types, "padding_mask": padding, "label": label})
        if not self.samples:
            raise TaskError(f"RACE data {path}: no questions found")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.samples[index]
