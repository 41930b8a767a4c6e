"""Checkpoints under pipeline parallelism: Megatron's mp_rank_TT_PPP layout with stage-local layer numbers
and word_embeddings_for_head, bitwise resume with dropout, resharding between TP x PP layouts (weights
unchanged, training continues identically), the Hugging Face export and import of PP checkpoints, and
generation from a PP checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pretrain_gpt
from megatron.checkpoint_format import from_megatron_state_dict, get_checkpoint_name
from megatron.text_generation import add_inference_args, generate, inference_args, load_model_for_inference
from tests.distributed_utils import run_distributed
from tools.checkpoint import export_hf, import_hf_gpt2, reshard
from tools.checkpoint.checkpoint_io import load_checkpoint_shards

BASE = (
    "--num-layers 4 --hidden-size 16 --num-attention-heads 2 --seq-length 16 --max-position-embeddings 16 "
    "--micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine "
    "--lr-warmup-iters 1 --log-interval 1 --eval-interval 1000 --eval-iters 1 --seed 7 "
    "--mock-data --tokenizer-type NullTokenizer --vocab-size 120 --make-vocab-size-divisible-by 2"
).split()
NO_DROPOUT = "--hidden-dropout 0 --attention-dropout 0".split()


def _losses(argv: list) -> list[float]:
    return [step["lm loss"] for step in pretrain_gpt.main([str(a) for a in argv])["losses"]]


def _train(rank: int, world_size: int, argv: list) -> list[float]:
    return _losses(argv)


def _resume(rank: int, world_size: int, grid: list, ckpt: str) -> tuple[list[float], list[float]]:
    base = [*BASE, *grid, "--train-iters", 6]
    straight = _losses([*base, "--save", ckpt + "_straight"])
    first = _losses([*base, "--save", ckpt, "--exit-interval", 3])
    second = _losses([*base, "--save", ckpt, "--load", ckpt])
    return straight, first + second


def test_layout_and_bitwise_resume_at_pp2_with_dropout(tmp_path):
    ckpt = tmp_path / "ckpt"
    for straight, resumed in run_distributed(
        _resume, 2, args=(["--pipeline-model-parallel-size", 2], str(ckpt))
    ):
        assert resumed == straight  # bitwise
    stage0 = torch.load(get_checkpoint_name(str(ckpt), 6, 0, 0), weights_only=False)
    stage1 = torch.load(get_checkpoint_name(str(ckpt), 6, 0, 1), weights_only=False)
    keys0, keys1 = (
        set(from_megatron_state_dict(stage0["model"])),
        set(from_megatron_state_dict(stage1["model"])),
    )
    layers = "language_model.encoder.layers."
    assert {k.split(".")[3] for k in keys0 if k.startswith(layers)} == {"0", "1"}  # local numbering
    assert {k.split(".")[3] for k in keys1 if k.startswith(layers)} == {"0", "1"}
    assert (
        "language_model.embedding.word_embeddings.weight" in keys0
        and "word_embeddings_for_head.weight" in keys1
    )
    assert (
        not any("final_layernorm" in k for k in keys0)
        and "language_model.encoder.final_layernorm.weight" in keys1
    )
    assert torch.equal(
        stage0["model"]["language_model"]["embedding"]["word_embeddings"]["weight"],
        stage1["model"]["word_embeddings_for_head"]["weight"],
    )
    assert stage0["args"].pipeline_model_parallel_size == 2


@pytest.mark.slow
def test_bitwise_resume_at_tp2_pp2_with_dropout(tmp_path):
    grid = ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2]
    for straight, resumed in run_distributed(_resume, 4, args=(grid, str(tmp_path / "ckpt"))):
        assert resumed == straight


def _whole(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = load_checkpoint_shards(str(path))
    assert checkpoint.tp_size == 1
    return checkpoint.model_shards()[0]


def _reshard_and_continue(tmp_path: Path, source_grid: list, source_world: int, target_pp: int) -> None:
    train = [*BASE, *NO_DROPOUT, "--train-iters", 3]
    run_distributed(_train, source_world, args=([*train, *source_grid, "--save", tmp_path / "a"],))
    reshard.main(
        [
            "--load",
            str(tmp_path / "a"),
            "--save",
            str(tmp_path / "b"),
            "--target-tensor-model-parallel-size",
            "1",
        ]
    )
    reshard.main(["--load", str(tmp_path / "b"), "--save", str(tmp_path / "c"), "--target-tensor-model-parallel-size", "1",
                  "--target-pipeline-model-parallel-size", str(target_pp)])  # fmt: skip
    whole_b, whole_c = _whole(tmp_path / "b"), _whole(tmp_path / "c")
    assert set(whole_b) == set(whole_c)
    for key in whole_b:
        assert torch.equal(whole_b[key], whole_c[key]), key
    more = [*BASE, *NO_DROPOUT, "--train-iters", 6, "--no-load-optim"]
    continued_b = _losses([*more, "--load", tmp_path / "b"])
    pp = ["--pipeline-model-parallel-size", target_pp]
    for continued_c in run_distributed(_train, target_pp, args=([*more, *pp, "--load", tmp_path / "c"],)):
        assert continued_c == pytest.approx(continued_b, rel=1e-5)


def test_reshard_pp2_to_pp1_to_pp2_continues_identically(tmp_path):
    _reshard_and_continue(tmp_path, ["--pipeline-model-parallel-size", 2], 2, 2)


@pytest.mark.slow
def test_reshard_tp2_pp2_to_tp1_pp1_to_pp4_continues_identically(tmp_path):
    grid = ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2]
    _reshard_and_continue(tmp_path, grid, 4, 4)


def _generate(rank: int, world_size: int, load: str) -> tuple[list, torch.Tensor]:
    """Sampled continuations (seeded) and their log probabilities, through the generation tools' loader."""
    parser = argparse.ArgumentParser()
    add_inference_args(parser)
    model, tokenizer, parallel = load_model_for_inference(inference_args(parser.parse_args(["--load", load])))
    out = generate(model, [[5, 6, 7], [8, 9]], 6, parallel, vocab_size=tokenizer.vocab_size, seed=3,
                   stop_on_eod=False, return_log_probs=True)  # fmt: skip
    return out.tokens.tolist(), out.log_probs


@pytest.mark.slow
def test_export_import_generate_of_a_pp_checkpoint(tmp_path):
    """export_hf reads a PP checkpoint: the same Hugging Face weights as from its PP 1 reshard, and
    import_hf_gpt2 writes them back as PP 2 stages; generation at PP 2 gives the tokens of PP 1.
    (Resharding with the optimizer state across stages: tests/test_reshard_optimizer_pp.py.)"""
    run_distributed(
        _train,
        2,
        args=([*BASE, "--train-iters", 2, "--pipeline-model-parallel-size", 2, "--save", tmp_path / "pp2"],),
    )
    reshard.main(
        [
            "--load",
            str(tmp_path / "pp2"),
            "--save",
            str(tmp_path / "pp1"),
            "--target-tensor-model-parallel-size",
            "1",
        ]
    )
    export_hf.main(["--load", str(tmp_path / "pp2"), "--output", str(tmp_path / "hf_pp2")])
    export_hf.main(["--load", str(tmp_path / "pp1"), "--output", str(tmp_path / "hf_pp1")])
    a, b = (
        load_file(tmp_path / "hf_pp2" / "model.safetensors"),
        load_file(tmp_path / "hf_pp1" / "model.safetensors"),
    )
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    import_hf_gpt2.main(["--hf-dir", str(tmp_path / "hf_pp2"), "--save", str(tmp_path / "back"),
                         "--pipeline-model-parallel-size", "2", "--make-vocab-size-divisible-by", "2"])  # fmt: skip
    assert (tmp_path / "back" / "release" / "mp_rank_00_001").is_dir()
    original, back = _whole(tmp_path / "pp1"), _whole(tmp_path / "back")
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)
    pp1_out = _generate(0, 1, str(tmp_path / "pp1"))
    for pp2_out in run_distributed(_generate, 2, args=(str(tmp_path / "pp2"),)):
        assert pp2_out[0] == pp1_out[0]  # the same tokens
        torch.testing.assert_close(pp2_out[1], pp1_out[1], rtol=1e-5, atol=1e-6)  # and log probabilities
