"""tools/checkpoint/reshard.py: TP=2 <-> TP=1 checkpoints give the same logits and the same continued
training (optimizer state included), vocabulary re-padding, exact round trips, and clean errors."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pretrain_gpt
from megatron.arguments import parse_args, transformer_config_from_args
from megatron.checkpoint_format import from_megatron_state_dict, get_checkpoint_name
from megatron.checkpointing import load_args_from_checkpoint, load_checkpoint, save_checkpoint
from megatron.model import GPTModel
from megatron.parallel.random import MODEL_PARALLEL_RNG, TP_SEED_OFFSET
from megatron.parallel.state import ParallelState, initialize_model_parallel, single_process_state
from megatron.tokenizer import vocab_size_with_padding
from tests.distributed_utils import run_distributed
from tools.checkpoint import reshard
from tools.checkpoint.optimizer_state import optimizer_param_names

ROOT = Path(__file__).resolve().parents[1]
TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --max-position-embeddings 16 "
    "--micro-batch-size 2 --global-batch-size 4 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine "
    "--lr-warmup-iters 1 --log-interval 100 --eval-interval 1000 --eval-iters 1 --seed 7 "
    "--hidden-dropout 0 --attention-dropout 0 --mock-data --tokenizer-type NullTokenizer --vocab-size 200"
).split()
FIRST, TOTAL = 4, 7  # train FIRST iterations and save; then continue to TOTAL
TOKENS = torch.arange(2 * 16).reshape(2, 16) * 37 % 201
POSITIONS = torch.arange(16).expand(2, 16)
WORD = "language_model.embedding.word_embeddings.weight"


def _train(argv: list) -> list[float]:
    summary = pretrain_gpt.main([str(a) for a in argv])
    return [step["lm loss"] for step in summary["losses"]]


def _logits(load_dir: str, parallel: ParallelState) -> np.ndarray:
    """Full-vocabulary logits of the checkpoint in `load_dir`, loaded at this run's TP size."""
    args = load_args_from_checkpoint(load_dir)
    model = GPTModel(transformer_config_from_args(args), parallel, parallel_output=False)
    load_checkpoint(model, None, None, load_dir, parallel, no_load_rng=True)
    model.eval()
    with torch.no_grad():
        return model(TOKENS, POSITIONS).numpy()


def _train_save_continue(rank: int, world_size: int, save_dir: str) -> dict:
    """At TP = world size: train FIRST iterations into save_dir, continue (without saving) to TOTAL."""
    tp = ["--tensor-model-parallel-size", world_size]
    first = _train([*TINY, *tp, "--train-iters", TOTAL, "--exit-interval", FIRST, "--save", save_dir])
    rest = _train([*TINY, *tp, "--train-iters", TOTAL, "--load", save_dir])
    logits = _logits(save_dir, initialize_model_parallel(world_size))
    return {"first": first, "rest": rest, "logits": logits}


def _continue_and_logits(rank: int, world_size: int, load_dir: str, load_flags: tuple) -> dict:
    """At TP = world size: logits of the checkpoint in load_dir, then continue training it to TOTAL."""
    logits = _logits(load_dir, initialize_model_parallel(world_size))
    rest = _train([*TINY, "--tensor-model-parallel-size", world_size, "--train-iters", TOTAL, "--load",
                   load_dir, *load_flags])  # fmt: skip
    return {"rest": rest, "logits": logits}


def _assert_curves_match(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) == TOTAL - FIRST
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-4 * abs(w), (got, want)


def _load_file(save_dir, iteration: int, tp_rank: int) -> dict:
    return torch.load(get_checkpoint_name(str(save_dir), iteration, tp_rank), weights_only=False)


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory) -> tuple[Path, dict]:
    save_dir = tmp_path_factory.mktemp("tp2") / "ckpt"
    return save_dir, run_distributed(_train_save_continue, 2, args=(str(save_dir),))[0]


@pytest.fixture(scope="module")
def tp1_run(tmp_path_factory) -> tuple[Path, dict]:
    save_dir = tmp_path_factory.mktemp("tp1") / "ckpt"
    return save_dir, _train_save_continue(0, 1, str(save_dir))


# ------------------------------------------------------------------------- equivalence across TP sizes


def test_tp2_to_tp1_same_logits_and_training_continues_identically(tp2_run, tmp_path):
    source, reference = tp2_run
    target = tmp_path / "tp1"
    reshard.main(["--load", str(source), "--save", str(target), "--target-tensor-model-parallel-size", "1",
                  "--keep-optimizer"])  # fmt: skip
    assert (target / "latest_checkpointed_iteration.txt").read_text() == str(FIRST)
    assert sorted(os.listdir(target / f"iter_{FIRST:07d}")) == ["mp_rank_00"]
    state = _load_file(target, FIRST, 0)
    assert state["args"].tensor_model_parallel_size == 1 and state["args"].padded_vocab_size == 256
    assert state["iteration"] == FIRST and state["args"].consumed_train_samples == FIRST * 4

    result = _continue_and_logits(0, 1, str(target), ())
    np.testing.assert_allclose(result["logits"], reference["logits"], rtol=1e-5, atol=1e-5)
    _assert_curves_match(result["rest"], reference["rest"])


def test_tp1_to_tp2_same_logits_and_training_continues_identically(tp1_run, tmp_path):
    source, reference = tp1_run
    target = tmp_path / "tp2"
    reshard.main(["--load", str(source), "--save", str(target), "--target-tensor-model-parallel-size", "2",
                  "--keep-optimizer"])  # fmt: skip
    results = run_distributed(_continue_and_logits, 2, args=(str(target), ()))
    for result in results:
        np.testing.assert_allclose(result["logits"], reference["logits"], rtol=1e-5, atol=1e-5)
        _assert_curves_match(result["rest"], reference["rest"])


def test_default_drops_optimizer_and_training_continues_with_no_load_optim(tp2_run, tmp_path):
    source, reference = tp2_run
    target = tmp_path / "tp1"
    reshard.main(["--load", str(source), "--save", str(target), "--target-tensor-model-parallel-size", "1"])
    state = _load_file(target, FIRST, 0)
    assert state["optimizer"] is None and state["opt_param_scheduler"] is not None
    result = _continue_and_logits(0, 1, str(target), ("--no-load-optim",))
    assert len(result["rest"]) == TOTAL - FIRST and all(np.isfinite(result["rest"]))
    assert result["rest"] != reference["rest"]  # fresh Adam moments: a different (but working) run


def test_qkv_shards_hold_whole_heads(tp1_run, tmp_path):
    """TP rank r holds heads 2r, 2r+1 (of 4): rows [heads, 3, head_dim] sliced contiguously."""
    source, _ = tp1_run
    target = tmp_path / "tp2"
    reshard.main(["--load", str(source), "--save", str(target), "--target-tensor-model-parallel-size", "2"])
    name = "language_model.encoder.layers.1.self_attention.query_key_value.weight"
    whole = from_megatron_state_dict(_load_file(source, FIRST, 0)["model"])[name].view(4, 3, 8, 32)
    for tp_rank in range(2):
        shard = from_megatron_state_dict(_load_file(target, FIRST, tp_rank)["model"])[name]
        assert torch.equal(shard.view(2, 3, 8, 32), whole[2 * tp_rank : 2 * tp_rank + 2])


def test_round_trip_1_4_2_1_is_bitwise(tp1_run, tmp_path):
    source, _ = tp1_run
    previous = source
    for tp in (4, 2, 1):
        target = tmp_path / f"tp{tp}"
        reshard.main(["--load", str(previous), "--save", str(target), "--target-tensor-model-parallel-size",
                      str(tp), "--keep-optimizer"])  # fmt: skip
        previous = target
    original, final = _load_file(source, FIRST, 0), _load_file(previous, FIRST, 0)
    for key in ("model", "optimizer", "opt_param_scheduler", "rng_state", "iteration", "checkpoint_version"):
        _assert_nested_equal(final[key], original[key], key)
    assert vars(final["args"]) == vars(original["args"])


def test_fp16_main_params_and_moments_are_resharded_exactly(tmp_path):
    """fp16 training keeps fp32 main copies and a grad scaler: split 1 -> 2 slices them, 2 -> 1 restores them."""
    _train([*TINY, "--train-iters", 2, "--fp16", "--initial-loss-scale", 128, "--save", tmp_path / "tp1"])
    for tp, source, target in ((2, "tp1", "tp2"), (1, "tp2", "back")):
        reshard.main(["--load", str(tmp_path / source), "--save", str(tmp_path / target),
                      "--target-tensor-model-parallel-size", str(tp), "--keep-optimizer"])  # fmt: skip
    original = _load_file(tmp_path / "tp1", 2, 0)
    main_word = original["optimizer"]["fp32_from_fp16_params"][0][
        0
    ]  # group 0 starts with the word embeddings
    exp_avg = original["optimizer"]["optimizer"]["state"][0]["exp_avg"]
    assert main_word.dtype == torch.float32 and main_word.shape == (256, 32) and exp_avg.any()
    for tp_rank in range(2):
        shard = _load_file(tmp_path / "tp2", 2, tp_rank)["optimizer"]
        rows = slice(128 * tp_rank, 128 * (tp_rank + 1))
        assert torch.equal(shard["fp32_from_fp16_params"][0][0], main_word[rows])
        assert torch.equal(shard["optimizer"]["state"][0]["exp_avg"], exp_avg[rows])
        assert shard["grad_scaler"] == original["optimizer"]["grad_scaler"]
    _assert_nested_equal(_load_file(tmp_path / "back", 2, 0)["optimizer"], original["optimizer"], "optimizer")


def test_new_tp_ranks_get_their_own_rng_stream(tp1_run, tmp_path):
    source, _ = tp1_run
    target = tmp_path / "tp2"
    reshard.main(["--load", str(source), "--save", str(target), "--target-tensor-model-parallel-size", "2"])
    original = _load_file(source, FIRST, 0)["rng_state"][0]
    rank0, rank1 = (_load_file(target, FIRST, r)["rng_state"][0] for r in range(2))
    _assert_nested_equal(rank0, original, "rank 0")
    assert torch.equal(rank1["torch_rng_state"], original["torch_rng_state"])
    expected = torch.Generator().manual_seed(7 + TP_SEED_OFFSET + 1).get_state()
    assert torch.equal(rank1["rng_tracker_states"][MODEL_PARALLEL_RNG]["cpu"], expected)


def test_optimizer_param_names_follow_the_optimizer_groups():
    """The optimizer's index order (decayed params, then biases and 1-D params) is rebuilt from the names."""
    model = GPTModel(transformer_config_from_args(_bf16_args()), single_process_state())
    decayed, not_decayed = optimizer_param_names(model.state_dict())
    assert decayed[0] == WORD and all(model.state_dict()[n].dim() > 1 for n in decayed)
    assert not_decayed[0] == "language_model.encoder.layers.0.input_layernorm.weight"
    assert len(decayed) + len(not_decayed) == len(list(model.parameters()))


def _assert_nested_equal(actual, expected, where: str) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and list(actual) == list(expected), where
        for key in expected:
            _assert_nested_equal(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_nested_equal(a, e, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), where
    elif isinstance(expected, np.ndarray):
        np.testing.assert_array_equal(actual, expected, err_msg=where)
    else:
        assert actual == expected, where


# ------------------------------------------------------------------------- vocabulary padding, bf16


def _bf16_args(divisible_by: int = 128, tp: int = 1, **extra) -> argparse.Namespace:
    argv = [*TINY, "--train-iters", "4", "--bf16", "--make-vocab-size-divisible-by", str(divisible_by)]
    args = parse_args([*argv, "--tensor-model-parallel-size", str(tp)], world_size=tp)
    args.padded_vocab_size = vocab_size_with_padding(201, divisible_by, tp)
    for name, value in extra.items():
        setattr(args, name, value)
    return args


def _save_random_model(save_dir: Path, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    model = GPTModel(transformer_config_from_args(args), single_process_state())
    save_checkpoint(3, model, None, None, args, single_process_state(), str(save_dir))
    return model.state_dict()


def test_vocab_is_repadded_when_the_multiple_changes(tmp_path):
    """NullTokenizer 200 (+ eod) = 201 ids; make_vocab_size_divisible_by 96: 288 rows at TP=1, 384 at TP=2."""
    original = _save_random_model(tmp_path / "tp1", _bf16_args(96))
    assert original[WORD].shape == (288, 32)
    reshard.main(["--load", str(tmp_path / "tp1"), "--save", str(tmp_path / "tp2"),
                  "--target-tensor-model-parallel-size", "2"])  # fmt: skip
    shards = [_load_file(tmp_path / "tp2", 3, r) for r in range(2)]
    assert shards[0]["args"].padded_vocab_size == 384 == vocab_size_with_padding(201, 96, 2)
    word = torch.cat([from_megatron_state_dict(s["model"])[WORD] for s in shards])
    assert word.dtype == torch.bfloat16 and word.shape == (384, 32)
    assert torch.equal(word[:288], original[WORD]) and not word[288:].any()

    # Back to TP=2 -> 1: V is ambiguous from 384 alone (anything in 193..384); the saved NullTokenizer says 201.
    reshard.main(["--load", str(tmp_path / "tp2"), "--save", str(tmp_path / "back"),
                  "--target-tensor-model-parallel-size", "1"])  # fmt: skip
    back = from_megatron_state_dict(_load_file(tmp_path / "back", 3, 0)["model"])
    _assert_nested_equal(back, original, "model")


def test_unknown_real_vocab_needs_true_vocab_size(tmp_path):
    """Without a loadable tokenizer, TP 1 -> 2 is still decidable (288 -> 384 for any V in 193..288), 2 -> 1 not."""
    _save_random_model(tmp_path / "tp1", _bf16_args(96, vocab_size=None, tokenizer_type="GPT2BPETokenizer"))
    reshard.main(["--load", str(tmp_path / "tp1"), "--save", str(tmp_path / "tp2"),
                  "--target-tensor-model-parallel-size", "2"])  # fmt: skip
    argv = ["--load", str(tmp_path / "tp2"), "--target-tensor-model-parallel-size", "1"]
    with pytest.raises(SystemExit, match="real vocabulary size.*--true-vocab-size"):
        reshard.main([*argv, "--save", str(tmp_path / "a")])
    with pytest.raises(SystemExit, match="a vocabulary of 100 tokens pads to 192 .* checkpoint's padded"):
        reshard.main([*argv, "--save", str(tmp_path / "b"), "--true-vocab-size", "100"])
    reshard.main([*argv, "--save", str(tmp_path / "c"), "--true-vocab-size", "201"])
    assert _load_file(tmp_path / "c", 3, 0)["args"].padded_vocab_size == 288
    assert sorted(os.listdir(tmp_path)) == ["c", "tp1", "tp2"]  # the failed runs left nothing behind


# ------------------------------------------------------------------------- bad input


@pytest.fixture
def small_checkpoint(tmp_path) -> Path:
    _save_random_model(tmp_path / "ckpt", _bf16_args())
    return tmp_path / "ckpt"


def _fails(argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as error:
        reshard.main([str(a) for a in argv])
    assert str(error.value).startswith("error: ") and message in str(error.value), str(error.value)


def test_bad_inputs_are_named(small_checkpoint, tmp_path):
    out = ["--save", tmp_path / "out", "--target-tensor-model-parallel-size", 2]
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(["--load", empty, *out], "latest_checkpointed_iteration.txt not found")
    _fails(["--load", tmp_path / "nowhere", *out], "no such directory")
    _fails(["--load", small_checkpoint, *out[:2], "--target-tensor-model-parallel-size", 3],
           "does not divide the 4 attention heads")  # fmt: skip
    _fails(["--load", small_checkpoint, "--save", small_checkpoint, "--target-tensor-model-parallel-size", 2],
           "must be a different folder")  # fmt: skip
    _fails(["--load", small_checkpoint, "--keep-optimizer", *out], "holds no optimizer state")
    (tmp_path / "out").mkdir()
    _fails(["--load", small_checkpoint, *out], "already exists; choose a new folder or pass --force")
    reshard.main([str(a) for a in ["--load", small_checkpoint, *out, "--force"]])
    assert sorted(os.listdir(tmp_path / "out" / "iter_0000003")) == ["mp_rank_00", "mp_rank_01"]

    shard_dir = small_checkpoint / "iter_0000003" / "mp_rank_00"
    os.remove(shard_dir / "model_optim_rng.pt")
    _fails(["--load", small_checkpoint, *out, "--force"], "model_optim_rng.pt not found")
    os.rmdir(shard_dir)
    _fails(["--load", small_checkpoint, *out, "--force"], "holds no mp_rank_XX shard directories")
    os.rmdir(small_checkpoint / "iter_0000003")
    _fails(["--load", small_checkpoint, *out, "--force"], "names '3' but")
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "empty", "out"]


def test_cli_error_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "checkpoint" / "reshard.py"), "--load", str(tmp_path / "in"),
         "--save", str(tmp_path / "out"), "--target-tensor-model-parallel-size", "2"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "error: --load" in proc.stderr and "Traceback" not in proc.stderr
