"""Helpers shared by the model tests (tiny configs, seeded builds, fixed inputs, one forward call per kind),
and the test that the name-based TP partition map agrees with the parameters' own attributes."""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch import Tensor, nn

from megatron.model import BertModel, GPTModel, TransformerConfig
from megatron.model.utils import tensor_parallel_dim
from megatron.parallel.random import model_parallel_seed
from megatron.parallel.state import ParallelState, single_process_state

VOCAB, BATCH, SEQ = 64, 3, 8


def tiny_config(kind: str, **overrides) -> TransformerConfig:
    """2 layers, h = 32, 4 heads, V = 64, no dropout unless overridden; BERT gets 2 token types."""
    fields = dict(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        padded_vocab_size=VOCAB,
        max_position_embeddings=16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    if kind == "bert":
        fields["num_tokentypes"] = 2
    fields.update(overrides)
    return TransformerConfig(**fields)


def build(
    kind: str, config: TransformerConfig, parallel: ParallelState, seed: int = 1234, **kwargs
) -> nn.Module:
    """Seed all generators (model_parallel_seed) then build the model, so builds are reproducible."""
    model_parallel_seed(seed, parallel)
    return (GPTModel if kind == "gpt" else BertModel)(config, parallel, **kwargs)


def fixed_inputs(kind: str, batch: int = BATCH, seq: int = SEQ) -> dict[str, Tensor]:
    """Token ids, labels and a random per-token loss weight from a private generator (same on all ranks)."""
    g = torch.Generator().manual_seed(0)
    inputs = {
        "ids": torch.randint(0, VOCAB, (batch, seq), generator=g),
        "labels": torch.randint(0, VOCAB, (batch, seq), generator=g),
        "weights": torch.rand(batch, seq, generator=g),
        "binary_weights": torch.rand(batch, 2, generator=g),
    }
    if kind == "gpt":
        inputs["position_ids"] = torch.arange(seq).expand(batch, seq)
    else:
        padding = torch.ones(batch, seq, dtype=torch.long)
        padding[0, -2:] = 0  # the first sample ends with two padding tokens
        inputs["padding_mask"] = padding
        inputs["tokentype_ids"] = (torch.arange(seq) >= seq // 2).long().expand(batch, seq)
    return inputs


def forward(
    kind: str, model: nn.Module, inputs: dict[str, Tensor], with_labels: bool
) -> tuple[Tensor, Optional[Tensor]]:
    """(logits or per-token loss, BERT's binary logits or None)."""
    labels = inputs["labels"] if with_labels else None
    if kind == "gpt":
        return model(inputs["ids"], inputs["position_ids"], labels=labels), None
    return model(inputs["ids"], inputs["padding_mask"], inputs["tokentype_ids"], lm_labels=labels)


def weighted_loss(kind: str, model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """A scalar with non-uniform gradients: sum(w * per-token loss) [+ sum(w' * binary logits)]."""
    loss, binary = forward(kind, model, inputs, with_labels=True)
    total = (loss * inputs["weights"]).sum()
    if binary is not None:
        total = total + (binary * inputs["binary_weights"]).sum()
    return total


def tp_shard(full: Tensor, name: str, parallel: ParallelState) -> Tensor:
    """This rank's slice of the TP = 1 tensor `full` of parameter `name` (the whole tensor if duplicated)."""
    dim = tensor_parallel_dim(name)
    if dim is None:
        return full
    return torch.chunk(full, parallel.tp_size, dim=dim)[parallel.tp_rank]


def assert_close_rel(actual: Tensor, expected: Tensor, rtol: float = 1e-5, what: str = "") -> None:
    """|actual - expected| <= rtol * (|expected| + max|expected|) elementwise (relative to the tensor's scale)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize(
    "kind, overrides",
    [("gpt", {}), ("bert", {}), ("gpt", {"position_embedding_type": "alibi", "embedding_layernorm": True})],
)
def test_tensor_parallel_dim_matches_parameter_attributes(kind: str, overrides: dict) -> None:
    model = build(kind, tiny_config(kind, **overrides), single_process_state())
    split = {name for name, p in model.named_parameters() if getattr(p, "tensor_model_parallel", False)}
    assert "language_model.embedding.word_embeddings.weight" in split
    assert ("lm_head.bias" in split) == (kind == "bert")
    for name, param in model.named_parameters():
        expected = param.partition_dim if name in split else None
        assert tensor_parallel_dim(name) == expected, name
