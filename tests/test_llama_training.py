"""Training a Llama-shaped GPT through pretrain_gpt.py: from a checkpoint with every parameter randomised
(norm weights included), TP 2 and TP 2 x DP 2 reproduce the single-process loss curve (dropout off); loss
falls on real text (WikiText-2)."""

from __future__ import annotations

import math

import pytest
import torch

import pretrain_gpt
from megatron.arguments import parse_args, transformer_config_from_args
from megatron.checkpointing import save_checkpoint
from megatron.model import GPTModel
from megatron.parallel.state import single_process_state
from megatron.tokenizer import build_tokenizer, vocab_size_with_padding
from tests.distributed_utils import run_distributed
from tools.checkpoint import reshard

LLAMA_FLAGS = (
    "--position-embedding-type rope --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --ffn-hidden-size 64 "
    "--group-query-attention --num-query-groups 2 --untie-embeddings-and-output-weights --disable-bias-linear "
    "--hidden-dropout 0 --attention-dropout 0"
).split()
TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
    "--micro-batch-size 2 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 2 "
    "--log-interval 4 --eval-interval 1000 --eval-iters 1 --seed 7"
).split()
MOCK = "--mock-data --tokenizer-type NullTokenizer --vocab-size 200".split()


def _randomised_checkpoint(save_dir: str) -> None:
    """A TP = 1 checkpoint of the Llama-shaped model with every parameter drawn at random."""
    args = parse_args([*TINY, *LLAMA_FLAGS, *MOCK, "--train-iters", "6"], world_size=1)
    args.padded_vocab_size = vocab_size_with_padding(build_tokenizer(args).vocab_size, 128, 1)
    model = GPTModel(transformer_config_from_args(args), single_process_state())
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.1 + (1.0 if "layernorm" in name else 0.0))
    save_checkpoint(0, model, None, None, args, single_process_state(), save_dir)


def _curve(rank: int, world_size: int, tp: int, load: str | None) -> list[float]:
    argv = [*TINY, *LLAMA_FLAGS, *MOCK, "--train-iters", "6", "--global-batch-size", "8",
            "--tensor-model-parallel-size", str(tp)]  # fmt: skip
    if load is not None:
        argv += ["--load", load, "--finetune"]
    return [step["lm loss"] for step in pretrain_gpt.main(argv)["losses"]]


def test_llama_tp2_and_tp2_dp2_reproduce_single_process(tmp_path):
    _randomised_checkpoint(str(tmp_path / "tp1"))
    reshard.main(["--load", str(tmp_path / "tp1"), "--save", str(tmp_path / "tp2"),
                  "--target-tensor-model-parallel-size", "2"])  # fmt: skip
    reference = _curve(0, 1, 1, str(tmp_path / "tp1"))
    assert len(reference) == 6 and reference[-1] < reference[0]
    assert abs(_curve(0, 1, 1, None)[0] - reference[0]) > 1e-3  # the randomised weights were loaded
    for world in (4,):  # TP 2 x DP 2 (TP 2 alone: tests/test_llama_parallel.py)
        for curve in run_distributed(_curve, world, args=(2, str(tmp_path / "tp2"))):
            for got, want in zip(curve, reference, strict=True):
                assert abs(got - want) <= 1e-5 * abs(want), (world, curve, reference)


def test_llama_loss_falls_on_real_text(tmp_path):
    try:
        from tests.shared_data import wikitext_gpt_dataset
    except FileNotFoundError as e:
        pytest.skip(f"WikiText-2 not available: {e}")
    prefix, tok = wikitext_gpt_dataset(tmp_path, num_docs=40, vocab_size=1000)
    argv = [*TINY, *LLAMA_FLAGS, "--train-iters", "80", "--global-batch-size", "8", "--lr", "5e-3",
            "--data-path", prefix, "--split", "98,2,0", "--data-cache-path", str(tmp_path), *tok]  # fmt: skip
    summary = pretrain_gpt.main(argv)
    losses = [step["lm loss"] for step in summary["losses"]]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > math.log(1000) - 1.0  # starts near uniform over the vocabulary
    assert last < first - 1.0, (first, last)
    assert summary["valid"] is not None and math.isfinite(summary["valid"]["lm loss"])


def test_llama_launch_example_trains_and_exports(tmp_path):
    """scripts/launch/llama.sh as shown (2 processes, TP 2), then its checkpoint exports to LlamaForCausalLM."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from transformers import LlamaForCausalLM

    from tests.distributed_utils import free_port
    from tools.checkpoint import export_hf

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", ITERS="4", LOG_INTERVAL="2", EVAL_INTERVAL="2", EVAL_ITERS="1",
               SAVE=str(tmp_path / "ckpt"), SAVE_INTERVAL="4", MASTER_PORT=str(free_port()))  # fmt: skip
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(["bash", str(root / "scripts/launch/llama.sh")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        "tensor-parallel 2 x pipeline-parallel 1 x data-parallel 1" in proc.stdout
        and " iteration        4/       4 |" in proc.stdout
    )
    export_hf.main(["--load", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf")])
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.config.num_key_value_heads == 2 and model.config.intermediate_size == 176
