"""Helpers for tests that compare whole training runs (distributed optimizer, sequence parallelism).

`train(argv)` runs pretrain_gpt's pipeline (mock data) on a GPT whose every parameter is randomised, so
that biases and layernorm parameters, which start at 0 and 1, cannot hide a missing gradient. A
parameter split over TP draws from a stream of its own per TP rank; a duplicated one draws the same
values on every TP rank (it must stay identical). `saved_params` reads the weights a run saved.
"""

from __future__ import annotations

import argparse
import os
import zlib
from typing import Optional

import torch
from torch import nn

import pretrain_gpt
from megatron.checkpointing import from_megatron_state_dict
from megatron.parallel.state import ParallelState
from megatron.run_state import RunState
from megatron.training import pretrain

TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
    "--micro-batch-size 2 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 2 "
    "--log-interval 100 --eval-interval 1000 --eval-iters 1 --seed 7 "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 200"
).split()
NO_DROPOUT = "--hidden-dropout 0 --attention-dropout 0".split()
# The gradient of the key bias is zero in exact arithmetic (softmax ignores a per-query constant), so in
# floating point it is rounding noise, which Adam with a tiny eps turns into lr-sized steps that differ
# with the summation order of a reduction (reduce-scatter vs all-reduce, sequence split or not). eps =
# 1e-5 keeps such noise (~1e-10) from moving weights while real gradients' updates keep their character.
ADAM_EPS = ["--adam-eps", "1e-5"]


@torch.no_grad()
def randomise_(model: nn.Module, parallel: ParallelState) -> None:
    """Overwrite every parameter with N(mean, 0.05^2) values drawn from a generator seeded by its name."""
    for name, param in model.named_parameters():
        split = bool(getattr(param, "tensor_model_parallel", False))
        seed = zlib.crc32(name.encode()) + (1000 * parallel.tp_rank if split else 0)
        generator = torch.Generator().manual_seed(seed)
        mean = 1.0 if "layernorm.weight" in name else 0.0
        values = mean + 0.05 * torch.randn(param.shape, generator=generator, dtype=torch.float32)
        param.copy_(values.to(param.dtype))


def randomised_gpt(args: argparse.Namespace, parallel: ParallelState, run: RunState) -> nn.Module:
    model = pretrain_gpt.model_provider(args, parallel, run)
    randomise_(model, parallel)
    return model


def train(argv: list, save: Optional[str] = None, load: Optional[str] = None) -> list[float]:
    """The lm loss of every iteration of a pretrain_gpt run on the randomised model."""
    argv = [str(a) for a in argv]
    if save:
        argv += ["--save", str(save)]
    if load:
        argv += ["--load", str(load)]
    summary = pretrain(
        pretrain_gpt.train_valid_test_datasets_provider,
        randomised_gpt,
        pretrain_gpt.forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        argv=argv,
    )
    return [step["lm loss"] for step in summary["losses"]]


def saved_file(save: str, tp_rank: int = 0, name: str = "model_optim_rng.pt") -> dict:
    """A file of the latest checkpoint in `save`."""
    with open(os.path.join(save, "latest_checkpointed_iteration.txt")) as f:
        iteration = int(f.read())
    path = os.path.join(save, f"iter_{iteration:07d}", f"mp_rank_{tp_rank:02d}", name)
    return torch.load(path, map_location="cpu", weights_only=False)


def saved_params(save: str, tp_rank: int = 0) -> dict[str, torch.Tensor]:
    """The flat model state dict of TP rank `tp_rank` in the latest checkpoint of `save`."""
    return from_megatron_state_dict(saved_file(save, tp_rank)["model"])


def assert_params_close(got: dict, want: dict, rtol: float, atol: float = 1e-7) -> None:
    """Same names, and every element within rtol (relative) + atol."""
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(
            got[name].float(), want[name].float(), rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


def assert_curves_close(got: list[float], want: list[float], rtol: float) -> None:
    assert len(got) == len(want) and got, (got, want)
    for g, w in zip(got, want):
        assert abs(g - w) <= rtol * abs(w), (got, want)
