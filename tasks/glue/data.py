"""GLUE sentence-pair classification data: MNLI and QQP in GLUE's tab-separated files.

A file has a header line naming its columns; the columns read are

    task   text A      text B      label column    labels (-> class id)
    MNLI   sentence1   sentence2   gold_label      contradiction 0, entailment 1, neutral 2
    QQP    question1   question2   is_duplicate    0 0, 1 1

(MNLI's train.tsv / dev_matched.tsv / dev_mismatched.tsv; QQP's train.tsv / dev.tsv; the class ids
are Megatron-LM's). Fields are split on tabs only: quotes are ordinary characters. Both texts go through
`clean_text`; a sample is [CLS] A [SEP] B [SEP] (tasks.data_utils.build_pair_input). QQP rows with an
empty question are skipped with a count, as Megatron-LM skips them; any other malformed line is an
error naming the file and line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from megatron.tokenizer import AbstractTokenizer
from tasks.data_utils import TaskError, build_pair_input, clean_text, pair_tensors


@dataclass(frozen=True)
class GlueTask:
    """The columns and label set of one GLUE task's files."""

    name: str
    text_a: str
    text_b: str
    label_column: str
    labels: dict[str, int]
    skip_empty_texts: bool

    @property
    def num_classes(self) -> int:
        return len(self.labels)


MNLI = GlueTask(
    "MNLI", "sentence1", "sentence2", "gold_label", {"contradiction": 0, "entailment": 1, "neutral": 2}, False
)
QQP = GlueTask("QQP", "question1", "question2", "is_duplicate", {"0": 0, "1": 1}, True)
GLUE_TASKS = {task.name: task for task in (MNLI, QQP)}


def read_glue_tsv(path: str, task: GlueTask) -> tuple[list[tuple[str, str, int]], int]:
    """([(text A, text B, class id)], number of skipped rows) of one GLUE file; TaskError on bad lines."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"{task.name} data {path}: cannot read the file: {e}") from e
    if not lines:
        raise TaskError(f"{path}:1: empty file; expected a header line naming the columns")
    header = [name.strip() for name in lines[0].split("\t")]
    columns = []
    for name in (task.text_a, task.text_b, task.label_column):
        if name not in header:
            raise TaskError(f"{path}:1: no {name!r} column in the header (columns: {header})")
        columns.append(header.index(name))
    rows, skipped = [], 0
    for line_number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) <= max(columns):
            raise TaskError(
                f"{path}:{line_number}: {len(fields)} tab-separated fields, the header has {len(header)}"
            )
        text_a, text_b, label = (fields[c].strip() for c in columns)
        if label not in task.labels:
            raise TaskError(
                f"{path}:{line_number}: {task.label_column} {label!r} is not one of {sorted(task.labels)}"
            )
        if not text_a or not text_b:
            if task.skip_empty_texts:
                skipped += 1
                continue
            raise TaskError(f"{path}:{line_number}: empty {task.text_a if not text_a else task.text_b}")
        rows.append((clean_text(text_a), clean_text(text_b), task.labels[label]))
    if not rows:
        raise TaskError(f"{task.name} data {path}: no samples after the header")
    return rows, skipped


class GlueDataset(Dataset):
    """Sentence pairs of one GLUE file: items {"text", "types", "padding_mask": int64 [seq_length],
    "label": int64 scalar}."""

    def __init__(self, path: str, task: GlueTask, tokenizer: AbstractTokenizer, seq_length: int) -> None:
        self.name = path
        rows, self.num_skipped = read_glue_tsv(path, task)
        special = (tokenizer.cls, tokenizer.sep, tokenizer.pad)
        self.samples = []
        for text_a, text_b, label in rows:
            pair = build_pair_input(
                tokenizer.tokenize(text_a), tokenizer.tokenize(text_b), seq_length, *special
            )
            self.samples.append({**pair_tensors(*pair), "label": torch.tensor(label, dtype=torch.long)})

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.samples[index]
