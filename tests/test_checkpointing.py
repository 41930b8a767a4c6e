"""Checkpoints: Megatron's layout on disk, exact save -> load resume at TP x DP, errors, and crash safety."""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from megatron.checkpoint_format import count_tensor_parallel_shards, weights_only_safe_globals
from megatron.checkpointing import (
    CheckpointError,
    from_megatron_state_dict,
    get_checkpoint_name,
    load_args_from_checkpoint,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
    to_megatron_state_dict,
)
from megatron.model.bert import BertModel
from megatron.model.config import TransformerConfig
from megatron.model.gpt import GPTModel
from megatron.parallel.random import MODEL_PARALLEL_RNG, get_rng_tracker, model_parallel_seed
from megatron.parallel.state import ParallelState, initialize_model_parallel, single_process_state
from tests.distributed_utils import run_distributed

VOCAB, SEQ = 32, 6
_TOKENS = torch.arange(2 * (SEQ + 1)).reshape(2, SEQ + 1) % VOCAB
_POSITIONS = torch.arange(SEQ).expand(2, SEQ)


def _config(**overrides) -> TransformerConfig:
    fields = dict(
        num_layers=2,
        hidden_size=8,
        num_attention_heads=2,
        padded_vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    fields.update(overrides)
    return TransformerConfig(**fields)


def _args(tp: int, **extra) -> argparse.Namespace:
    """The Megatron argument names a checkpoint carries (those converters and --use-checkpoint-args read)."""
    return argparse.Namespace(
        num_layers=2,
        hidden_size=8,
        ffn_hidden_size=32,
        num_attention_heads=2,
        max_position_embeddings=SEQ,
        padded_vocab_size=VOCAB,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        bias_gelu_fusion=False,
        openai_gelu=False,
        consumed_train_samples=96,
        consumed_valid_samples=12,
        **extra,
    )


def _build(parallel: ParallelState, dp_seed: int):
    """GPT model (same weights on every DP rank), AdamW and a StepLR scheduler, after two training steps.

    The RNGs are then reseeded per DP rank, so each DP rank has its own RNG state to save.
    """
    model_parallel_seed(1234, parallel)
    model = GPTModel(_config(), parallel, parallel_output=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(2):
        loss = model(_TOKENS[:, :-1], _POSITIONS, labels=_TOKENS[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    model_parallel_seed(dp_seed, parallel)
    return model, optimizer, scheduler


def _draw_random() -> list[float]:
    """Numbers from every generator a checkpoint restores: python, numpy, torch, the TP tracker's stream."""
    with get_rng_tracker().fork():
        tracked = torch.rand(2).tolist()
    return [random.random(), float(np.random.rand()), *torch.rand(2).tolist(), *tracked]


def _snapshot(model, optimizer, scheduler) -> dict:
    return copy.deepcopy(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
    )


def _perturb(model, optimizer, scheduler) -> None:
    """Change everything a load must restore."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
            p.grad = torch.ones_like(p)
    optimizer.step()
    scheduler.step()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    get_rng_tracker().reset()
    get_rng_tracker().add(MODEL_PARALLEL_RNG, 999)


def _assert_nested_equal(actual, expected, where: str = "") -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            _assert_nested_equal(actual[key], expected[key], f"{where}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_nested_equal(a, e, f"{where}[{i}]")
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(actual, expected), where
    else:
        assert actual == expected, where


# ------------------------------------------------------------------------------------------- format


def test_checkpoint_names() -> None:
    assert get_checkpoint_name("/ck", 100, 0) == "/ck/iter_0000100/mp_rank_00/model_optim_rng.pt"
    assert (
        get_checkpoint_name("/ck", 1234567, 3, pp_rank=2)
        == "/ck/iter_1234567/mp_rank_03_002/model_optim_rng.pt"
    )
    assert get_checkpoint_name("/ck", 5, 1, release=True) == "/ck/release/mp_rank_01/model_optim_rng.pt"


def test_nested_layout_of_bert_keys_and_round_trip() -> None:
    flat = {
        name: torch.full((1,), float(i))
        for i, name in enumerate(
            [
                "language_model.embedding.word_embeddings.weight",
                "language_model.embedding.position_embeddings.weight",
                "language_model.embedding.tokentype_embeddings.weight",
                "language_model.embedding.embedding_layernorm.bias",
                "language_model.encoder.layers.0.self_attention.query_key_value.weight",
                "language_model.encoder.final_layernorm.bias",
                "language_model.pooler.dense.weight",
                "lm_head.dense.weight",
                "lm_head.layernorm.bias",
                "lm_head.bias",
                "binary_head.weight",
                "extra",
            ]
        )
    }
    nested = to_megatron_state_dict(flat)
    lm = nested["language_model"]
    assert set(nested) == {"language_model", "lm_head", "binary_head", "extra"}
    assert set(lm) == {"embedding", "encoder", "pooler"}
    assert set(lm["embedding"]) == {
        "word_embeddings",
        "position_embeddings",
        "tokentype_embeddings",
        "embedding_layernorm",
    }
    assert (
        lm["embedding"]["word_embeddings"]["weight"]
        is flat["language_model.embedding.word_embeddings.weight"]
    )
    assert set(lm["embedding"]["embedding_layernorm"]) == {"bias"}
    assert set(lm["encoder"]) == {"layers.0.self_attention.query_key_value.weight", "final_layernorm.bias"}
    assert set(lm["pooler"]) == {"dense.weight"}
    assert set(nested["lm_head"]) == {"dense.weight", "layernorm.bias", "bias"}
    assert set(nested["binary_head"]) == {"weight"}
    assert from_megatron_state_dict(nested) == flat


def test_old_transformer_key_reads_as_encoder() -> None:
    weight = torch.ones(2)
    flat = from_megatron_state_dict({"language_model": {"transformer": {"final_layernorm.weight": weight}}})
    assert flat == {"language_model.encoder.final_layernorm.weight": weight}


def test_read_metadata(tmp_path) -> None:
    assert read_metadata(str(tmp_path)) is None
    tracker = tmp_path / "latest_checkpointed_iteration.txt"
    tracker.write_text("42\n")
    assert read_metadata(str(tmp_path)) == (42, False)
    tracker.write_text("release")
    assert read_metadata(str(tmp_path)) == (0, True)
    tracker.write_text("iter_42")
    with pytest.raises(CheckpointError, match="latest_checkpointed_iteration.txt.*'iter_42'"):
        read_metadata(str(tmp_path))


# --------------------------------------------------------------------------------- single process


def test_layout_on_disk(tmp_path) -> None:
    parallel = single_process_state()
    model, optimizer, scheduler = _build(parallel, dp_seed=5)
    written = save_checkpoint(100, model, optimizer, scheduler, _args(1), parallel, str(tmp_path))

    assert written == str(tmp_path / "iter_0000100")
    assert sorted(os.listdir(tmp_path)) == ["iter_0000100", "latest_checkpointed_iteration.txt"]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "100"
    assert os.listdir(tmp_path / "iter_0000100") == ["mp_rank_00"]
    assert os.listdir(tmp_path / "iter_0000100" / "mp_rank_00") == ["model_optim_rng.pt"]

    state = torch.load(tmp_path / "iter_0000100/mp_rank_00/model_optim_rng.pt", weights_only=False)
    assert set(state) == {
        "args",
        "checkpoint_version",
        "iteration",
        "model",
        "optimizer",
        "opt_param_scheduler",
        "rng_state",
    }
    assert state["checkpoint_version"] == 3.0 and state["iteration"] == 100
    assert state["args"].consumed_train_samples == 96
    embedding = state["model"]["language_model"]["embedding"]
    assert torch.equal(
        embedding["word_embeddings"]["weight"], model.language_model.embedding.word_embeddings.weight
    )
    assert embedding["position_embeddings"]["weight"].shape == (SEQ, 8)
    encoder = state["model"]["language_model"]["encoder"]
    assert encoder["layers.1.self_attention.query_key_value.weight"].shape == (24, 8)
    assert "final_layernorm.bias" in encoder
    _assert_nested_equal(state["optimizer"], optimizer.state_dict())
    assert state["opt_param_scheduler"] == scheduler.state_dict()
    assert len(state["rng_state"]) == 1
    assert set(state["rng_state"][0]) >= {
        "random_rng_state",
        "np_rng_state",
        "torch_rng_state",
        "rng_tracker_states",
    }
    # Readers that use weights_only=True (Hugging Face's converters) can load it with our allow-list.
    with torch.serialization.safe_globals(weights_only_safe_globals()):
        torch.load(tmp_path / "iter_0000100/mp_rank_00/model_optim_rng.pt", weights_only=True)


def test_bert_checkpoint_nests_heads(tmp_path) -> None:
    parallel = single_process_state()
    model_parallel_seed(3, parallel)
    config = _config(num_tokentypes=2, embedding_layernorm=True)
    model = BertModel(config, parallel)
    save_checkpoint(1, model, None, None, _args(1), parallel, str(tmp_path))
    state = torch.load(get_checkpoint_name(str(tmp_path), 1, 0), weights_only=False)
    nested = state["model"]
    assert set(nested) == {"language_model", "lm_head", "binary_head"}
    assert set(nested["language_model"]) == {"embedding", "encoder", "pooler"}
    assert set(nested["language_model"]["embedding"]) == {
        "word_embeddings",
        "embedding_layernorm",
        "position_embeddings",
        "tokentype_embeddings",
    }
    assert set(nested["language_model"]["pooler"]) == {"dense.weight", "dense.bias"}
    assert set(nested["lm_head"]) == {
        "dense.weight",
        "dense.bias",
        "layernorm.weight",
        "layernorm.bias",
        "bias",
    }
    assert set(nested["binary_head"]) == {"weight", "bias"}
    assert state["optimizer"] is None and state["opt_param_scheduler"] is None

    model_parallel_seed(4, parallel)
    other = BertModel(config, parallel)
    assert load_checkpoint(other, None, None, str(tmp_path), parallel)[0] == 1
    _assert_nested_equal(other.state_dict(), model.state_dict())


def test_missing_or_empty_dir_is_a_fresh_start(tmp_path, capsys) -> None:
    parallel = single_process_state()
    model = GPTModel(_config(), parallel)
    assert load_checkpoint(model, None, None, str(tmp_path / "absent"), parallel) == (0, None)
    assert load_checkpoint(model, None, None, str(tmp_path), parallel) == (0, None)
    assert "starting from randomly initialised weights" in capsys.readouterr().out


def test_finetune_and_no_load_flags(tmp_path) -> None:
    parallel = single_process_state()
    model, optimizer, scheduler = _build(parallel, dp_seed=5)
    save_checkpoint(30, model, optimizer, scheduler, _args(1), parallel, str(tmp_path))
    saved = _snapshot(model, optimizer, scheduler)

    _perturb(model, optimizer, scheduler)
    perturbed = _snapshot(model, optimizer, scheduler)
    random_after_perturb = _draw_random()
    _perturb(model, optimizer, scheduler)
    iteration, args = load_checkpoint(model, optimizer, scheduler, str(tmp_path), parallel, finetune=True)
    assert iteration == 0 and args.consumed_train_samples == 96
    _assert_nested_equal(model.state_dict(), saved["model"])
    # finetune keeps the optimizer, scheduler and RNG of the current run
    assert optimizer.state_dict()["state"][0]["step"] > perturbed["optimizer"]["state"][0]["step"]
    assert _draw_random() == random_after_perturb

    iteration, _ = load_checkpoint(model, optimizer, scheduler, str(tmp_path), parallel, no_load_optim=True)
    assert iteration == 30
    assert scheduler.state_dict() != saved["scheduler"]
    load_checkpoint(model, optimizer, scheduler, str(tmp_path), parallel, no_load_rng=True)
    _assert_nested_equal(optimizer.state_dict(), saved["optimizer"])


def test_release_checkpoint_loads_weights_only(tmp_path) -> None:
    parallel = single_process_state()
    model, optimizer, scheduler = _build(parallel, dp_seed=5)
    save_checkpoint(30, model, None, None, _args(1), parallel, str(tmp_path))
    os.rename(tmp_path / "iter_0000030", tmp_path / "release")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
    fresh, fresh_optimizer, _ = _build(single_process_state(), dp_seed=6)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    assert load_checkpoint(fresh, fresh_optimizer, None, str(tmp_path), parallel)[0] == 0
    _assert_nested_equal(fresh.state_dict(), model.state_dict())


def test_load_args_from_checkpoint(tmp_path) -> None:
    parallel = single_process_state()
    model = GPTModel(_config(), parallel)
    save_checkpoint(3, model, None, None, _args(1, seq_length=SEQ), parallel, str(tmp_path))
    args = load_args_from_checkpoint(str(tmp_path))
    assert args.seq_length == SEQ and args.hidden_size == 8
    with pytest.raises(CheckpointError, match="not found"):
        load_args_from_checkpoint(str(tmp_path / "nothing"))


def test_missing_checkpoint_dir_or_shard_is_named(tmp_path) -> None:
    parallel = single_process_state()
    model = GPTModel(_config(), parallel)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("9")
    with pytest.raises(CheckpointError, match="iter_0000009 does not exist"):
        load_checkpoint(model, None, None, str(tmp_path), parallel)
    os.makedirs(tmp_path / "iter_0000009" / "mp_rank_00")
    with pytest.raises(CheckpointError, match="mp_rank_00/model_optim_rng.pt not found"):
        load_checkpoint(model, None, None, str(tmp_path), parallel)
    (tmp_path / "iter_0000009" / "mp_rank_00" / "model_optim_rng.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="cannot read checkpoint file .*model_optim_rng.pt"):
        load_checkpoint(model, None, None, str(tmp_path), parallel)


def test_model_mismatch_is_a_checkpoint_error(tmp_path) -> None:
    parallel = single_process_state()
    save_checkpoint(1, GPTModel(_config(), parallel), None, None, _args(1), parallel, str(tmp_path))
    wider = GPTModel(_config(num_layers=3), parallel)
    with pytest.raises(CheckpointError, match="(?s)does not match.*layers.2"):
        load_checkpoint(wider, None, None, str(tmp_path), parallel)
    load_checkpoint(wider, None, None, str(tmp_path), parallel, strict=False)


def test_optimizer_missing_from_checkpoint_suggests_flag(tmp_path) -> None:
    parallel = single_process_state()
    model, optimizer, scheduler = _build(parallel, dp_seed=5)
    save_checkpoint(1, model, None, None, _args(1), parallel, str(tmp_path))
    with pytest.raises(CheckpointError, match="no 'optimizer'.*--no-load-optim"):
        load_checkpoint(model, optimizer, scheduler, str(tmp_path), parallel)
    assert load_checkpoint(model, optimizer, scheduler, str(tmp_path), parallel, no_load_optim=True)[0] == 1


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch) -> None:
    parallel = single_process_state()
    model, optimizer, scheduler = _build(parallel, dp_seed=5)
    save_checkpoint(10, model, optimizer, scheduler, _args(1), parallel, str(tmp_path))
    saved = _snapshot(model, optimizer, scheduler)

    real_save = torch.save

    def save_half_then_fail(obj, f):
        f.write(b"partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    _perturb(model, optimizer, scheduler)
    with pytest.raises(CheckpointError, match="iter_0000020.tmp-.*OSError: disk full"):
        save_checkpoint(20, model, optimizer, scheduler, _args(1), parallel, str(tmp_path))
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "10"
    assert any(e.startswith("iter_0000020.tmp-") for e in os.listdir(tmp_path))

    assert load_checkpoint(model, optimizer, scheduler, str(tmp_path), parallel)[0] == 10
    _assert_nested_equal(_snapshot(model, optimizer, scheduler), saved)

    monkeypatch.setattr(torch, "save", real_save)
    save_checkpoint(20, model, optimizer, scheduler, _args(1), parallel, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [
        "iter_0000010",
        "iter_0000020",
        "latest_checkpointed_iteration.txt",
    ]


def test_crash_while_resaving_same_iteration_falls_back_to_replaced_copy(tmp_path, monkeypatch) -> None:
    parallel = single_process_state()
    model, optimizer, scheduler = _build(parallel, dp_seed=5)
    save_checkpoint(10, model, optimizer, scheduler, _args(1), parallel, str(tmp_path))
    saved = _snapshot(model, optimizer, scheduler)
    _perturb(model, optimizer, scheduler)

    real_rename = os.rename

    def crash_on_second_rename(src, dst):
        if ".tmp-" in str(src):  # the old dir was just moved aside; "die" before the new one moves in
            raise OSError("killed")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_second_rename)
    with pytest.raises(CheckpointError, match="moving .* into place"):
        save_checkpoint(10, model, optimizer, scheduler, _args(1), parallel, str(tmp_path))
    monkeypatch.setattr(os, "rename", real_rename)
    assert not (tmp_path / "iter_0000010").exists()

    assert load_checkpoint(model, optimizer, scheduler, str(tmp_path), parallel)[0] == 10
    _assert_nested_equal(_snapshot(model, optimizer, scheduler), saved)
    save_checkpoint(10, model, optimizer, scheduler, _args(1), parallel, str(tmp_path))
    save_checkpoint(11, model, optimizer, scheduler, _args(1), parallel, str(tmp_path))  # cleans debris
    assert sorted(os.listdir(tmp_path)) == [
        "iter_0000010",
        "iter_0000011",
        "latest_checkpointed_iteration.txt",
    ]


_KILLED_SAVER = """
import sys, time, torch
from megatron import checkpointing
from megatron.parallel.state import single_process_state
from tests.test_checkpointing import _args, _build

save_dir, marker = sys.argv[1], sys.argv[2]
parallel = single_process_state()
model, optimizer, scheduler = _build(parallel, dp_seed=5)
checkpointing.save_checkpoint(1, model, optimizer, scheduler, _args(1), parallel, save_dir)
real_save = torch.save

def save_then_hang(obj, f):
    real_save(obj, f)
    f.flush()
    open(marker, "w").close()
    time.sleep(600)

torch.save = save_then_hang
checkpointing.save_checkpoint(2, model, optimizer, scheduler, _args(1), parallel, save_dir)
"""


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path) -> None:
    save_dir, marker = tmp_path / "ckpt", tmp_path / "writing"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_KILLED_SAVER), str(save_dir), str(marker)],
        cwd=repo,
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (
                "saver died or never got to iteration 2"
            )
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (save_dir / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert any(e.startswith("iter_0000002.tmp-") for e in os.listdir(save_dir))
    parallel = single_process_state()
    model, optimizer, scheduler = _build(parallel, dp_seed=6)
    assert load_checkpoint(model, optimizer, scheduler, str(save_dir), parallel)[0] == 1


def _kill_at_save_steps(tmp_path, quick: bool) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.save_killer", str(tmp_path), *(["--quick"] if quick else [])],
        cwd=repo, capture_output=True, text=True, timeout=900,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=repo),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind, steps in (("fresh", report["steps"]), ("resave", report["resave_steps"])):
        tracker_write = next(i for i, step in enumerate(steps, 1) if step.startswith("replace latest"))
        for result in report[kind]:
            # The latest checkpoint loads and training resumes exactly where the uninterrupted run was.
            assert result["resume_status"] == 0, result
            assert result["resumed_loss"] == result["expected_loss"], result
            # The tracker moves to iteration 2 with its own replacement, never before.
            assert result["tracked"] == (2 if result["k"] >= tracker_write else 1), result
    return report


def test_sigkill_after_each_kind_of_save_step_leaves_a_checkpoint_that_resumes(tmp_path) -> None:
    """A training process killed after the shard write, after its fsync, between the renames of a re-save,
    and after the tracker write: the latest checkpoint loads and training resumes bitwise."""
    report = _kill_at_save_steps(tmp_path, quick=True)
    killed = [r["killed_after"].split(" ")[0] for r in report["fresh"] + report["resave"]]
    assert killed == ["torch.save", "fsync", "replace", "rename"]
    assert report["resave"][0]["killed_after"].startswith("rename iter_0000002 -> iter_0000002.old-")


@pytest.mark.slow
def test_sigkill_at_every_step_of_a_save_leaves_a_checkpoint_that_resumes(tmp_path) -> None:
    report = _kill_at_save_steps(tmp_path, quick=False)
    assert [r["k"] for r in report["fresh"]] == list(range(1, len(report["steps"]) + 1))
    assert [r["k"] for r in report["resave"]] == list(range(1, len(report["resave_steps"]) + 1))


# ------------------------------------------------------------------------------------ multi-rank


_REAL_TORCH_SAVE = torch.save


def _save_fails(obj, f, **kwargs) -> None:
    """torch.save that fails for checkpoint files (and works for the pickling inside all_gather_object)."""
    if getattr(f, "name", "").endswith(".pt.tmp"):
        raise OSError("quota exceeded")
    _REAL_TORCH_SAVE(obj, f, **kwargs)


def _distributed_body(rank: int, world_size: int, tp: int, save_dir: str) -> dict:
    """Save at iteration 7, perturb, load, check exactness; then a save of iteration 8 in which the write of
    the last TP rank fails must fail on every rank and leave iteration 7 as the loadable latest checkpoint."""
    parallel = initialize_model_parallel(tp)
    model, optimizer, scheduler = _build(parallel, dp_seed=100 + parallel.dp_rank)
    written = save_checkpoint(7, model, optimizer, scheduler, _args(tp), parallel, save_dir)
    expected_random = _draw_random()
    saved = _snapshot(model, optimizer, scheduler)

    _perturb(model, optimizer, scheduler)
    iteration, args = load_checkpoint(model, optimizer, scheduler, save_dir, parallel)
    assert written == os.path.join(save_dir, "iter_0000007")
    assert iteration == 7 and args.consumed_train_samples == 96
    _assert_nested_equal(_snapshot(model, optimizer, scheduler), saved)
    assert _draw_random() == expected_random
    model.eval()
    logits = model(_TOKENS[:, :SEQ], _POSITIONS)  # the full vocabulary: built with parallel_output=False

    if rank == tp - 1:  # the writer (DP rank 0) of the last TP rank
        torch.save = _save_fails
    try:
        save_checkpoint(8, model, optimizer, scheduler, _args(tp), parallel, save_dir)
    except CheckpointError as e:
        failure = str(e)
    else:
        raise AssertionError("save_checkpoint did not fail")
    finally:
        torch.save = _REAL_TORCH_SAVE
    _perturb(model, optimizer, scheduler)
    assert load_checkpoint(model, optimizer, scheduler, save_dir, parallel)[0] == 7
    _assert_nested_equal(_snapshot(model, optimizer, scheduler), saved)

    # numpy, not tensors: tensors would travel through shared memory that dies with this process
    return {
        "model": {name: tensor.numpy() for name, tensor in saved["model"].items()},
        "random": expected_random,
        "logits": logits.detach().numpy(),
        "failure": failure,
    }


def _check_distributed_run(save_dir: str, results: list[dict], world_size: int, tp: int) -> None:
    entries = os.listdir(save_dir)
    assert sorted(e for e in entries if ".tmp-" not in e) == [
        "iter_0000007",
        "latest_checkpointed_iteration.txt",
    ]
    assert [e for e in entries if ".tmp-" in e] == [
        next(e for e in entries if e.startswith("iter_0000008.tmp-"))
    ]
    assert sorted(os.listdir(os.path.join(save_dir, "iter_0000007"))) == [
        f"mp_rank_{r:02d}" for r in range(tp)
    ]
    dp_size = world_size // tp
    for tp_rank in range(tp):
        state = torch.load(get_checkpoint_name(save_dir, 7, tp_rank), weights_only=False)
        # The shard of TP rank r is the model of global rank r, the first rank of its DP group.
        shard = from_megatron_state_dict(state["model"])
        assert shard.keys() == results[tp_rank]["model"].keys()
        for name, array in results[tp_rank]["model"].items():
            assert torch.equal(shard[name], torch.from_numpy(array)), name
        assert len(state["rng_state"]) == dp_size
    # Every rank saved and got back its own RNG streams (DP ranks were seeded apart; TP ranks' trackers differ).
    assert len({tuple(r["random"]) for r in results}) == world_size
    # The failed save: the failing rank names its error, the others say another rank failed.
    for rank, result in enumerate(results):
        assert ("quota exceeded" if rank == tp - 1 else "another rank failed") in result["failure"]
    assert all("iter_0000008.tmp-" in r["failure"] for r in results)


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory) -> tuple[str, list[dict]]:
    """One world-2, TP=2 run of `_distributed_body` (shared: spawning ranks is the slow part)."""
    save_dir = str(tmp_path_factory.mktemp("tp2"))
    return save_dir, run_distributed(_distributed_body, 2, args=(2, save_dir))


@pytest.mark.parametrize("world_size,tp", [(1, 1), (2, 1), (4, 2)])
def test_distributed_save_load_and_failed_save(tmp_path, world_size: int, tp: int) -> None:
    results = run_distributed(_distributed_body, world_size, args=(tp, str(tmp_path)))
    _check_distributed_run(str(tmp_path), results, world_size, tp)


def test_tensor_parallel_save_writes_one_shard_per_tp_rank(tp2_run) -> None:
    save_dir, results = tp2_run
    _check_distributed_run(save_dir, results, world_size=2, tp=2)
    word = "language_model.embedding.word_embeddings.weight"
    assert results[0]["model"][word].shape == (VOCAB // 2, 8)
    assert not np.array_equal(results[0]["model"][word], results[1]["model"][word])
    np.testing.assert_array_equal(results[0]["logits"], results[1]["logits"])


def test_tensor_parallel_size_mismatch_is_an_error(tp2_run) -> None:
    save_dir, _ = tp2_run
    assert count_tensor_parallel_shards(os.path.join(save_dir, "iter_0000007")) == 2
    parallel = single_process_state()
    with pytest.raises(
        CheckpointError,
        match="--tensor-model-parallel-size 2 x --pipeline-model-parallel-size 1 but this run uses 1 x 1.*"
        "tools/checkpoint/reshard.py",
    ):
        load_checkpoint(GPTModel(_config(), parallel), None, None, save_dir, parallel)


# ---------------------------------------------------------------------- Hugging Face's converter


class _Converted(Exception):
    """Raised from inside the converter to hand back its GPT-2 state dict before its (buggy) file saving."""

    def __init__(self, state_dict: dict) -> None:
        super().__init__("converted")
        self.state_dict = state_dict


def _convert_with_hf(checkpoint_dir: str, out_dir: str, monkeypatch):
    """Run transformers' convert_checkpoint_from_megatron_to_transformers on one iteration dir.

    Its tail (tokenizer download, shard saving, which indexes the Megatron dict by HF names in 4.57) is
    stubbed: the GPT-2 state dict is captured where it is handed to the shard splitter.
    """
    from transformers import GPT2Config
    from transformers.models.megatron_gpt2 import checkpoint_reshaping_and_interoperability as hf

    class OfflineTokenizer:
        @staticmethod
        def from_pretrained(name):
            return OfflineTokenizer()

    def capture(state_dict, max_shard_size):
        raise _Converted(state_dict)

    monkeypatch.setattr(hf, "AutoTokenizer", OfflineTokenizer)
    monkeypatch.setattr(hf, "split_torch_state_dict_into_shards", capture)
    args = argparse.Namespace(
        load_path=checkpoint_dir,
        save_path=out_dir,
        print_checkpoint_structure=False,
        tokenizer_name=None,
        max_shard_size="10GB",
    )
    with torch.serialization.safe_globals(weights_only_safe_globals()):
        with pytest.raises(_Converted) as converted:
            hf.convert_checkpoint_from_megatron_to_transformers(args)
    return GPT2Config.from_pretrained(out_dir), converted.value.state_dict


def _hf_logits(config, state_dict: dict) -> torch.Tensor:
    from transformers import GPT2LMHeadModel

    config._attn_implementation = "eager"
    hf_model = GPT2LMHeadModel(config).eval()
    buffers = {k: v for k, v in state_dict.items() if k.endswith((".attn.bias", ".attn.masked_bias"))}
    missing, unexpected = hf_model.load_state_dict(
        {k: v for k, v in state_dict.items() if k not in buffers}, strict=False
    )
    assert missing == [] and unexpected == []
    with torch.no_grad():
        return hf_model(_TOKENS[:, :SEQ]).logits


def test_hf_converter_reads_our_gpt_checkpoint(tmp_path, monkeypatch) -> None:
    parallel = single_process_state()
    model, _, _ = _build(parallel, dp_seed=5)
    save_checkpoint(5, model, None, None, _args(1), parallel, str(tmp_path / "ckpt"))
    config, converted = _convert_with_hf(
        str(tmp_path / "ckpt" / "iter_0000005"), str(tmp_path / "hf"), monkeypatch
    )

    assert (config.n_layer, config.n_embd, config.n_head, config.vocab_size) == (2, 8, 2, VOCAB)
    assert config.activation_function == "gelu"
    ours = model.state_dict()
    assert torch.equal(
        converted["transformer.wte.weight"], ours["language_model.embedding.word_embeddings.weight"]
    )
    assert torch.equal(converted["lm_head.weight"], converted["transformer.wte.weight"])
    assert torch.equal(
        converted["transformer.wpe.weight"], ours["language_model.embedding.position_embeddings.weight"]
    )
    assert converted["transformer.h.1.attn.c_attn.weight"].shape == (8, 24)
    assert torch.equal(
        converted["transformer.h.1.mlp.c_proj.weight"],
        ours["language_model.encoder.layers.1.mlp.dense_4h_to_h.weight"].T,
    )
    assert torch.equal(
        converted["transformer.ln_f.bias"], ours["language_model.encoder.final_layernorm.bias"]
    )
    # The QKV re-ordering the converter applies matches ours: the same network gives the same logits.
    model.eval()
    with torch.no_grad():
        expected = model(_TOKENS[:, :SEQ], _POSITIONS)
    torch.testing.assert_close(_hf_logits(config, converted), expected, rtol=1e-5, atol=1e-5)


def test_hf_converter_merges_our_tensor_parallel_shards(tp2_run, tmp_path, monkeypatch) -> None:
    save_dir, results = tp2_run
    config, converted = _convert_with_hf(
        os.path.join(save_dir, "iter_0000007"), str(tmp_path / "hf"), monkeypatch
    )
    word = "language_model.embedding.word_embeddings.weight"
    expected_wte = np.concatenate([results[0]["model"][word], results[1]["model"][word]])
    np.testing.assert_array_equal(converted["transformer.wte.weight"].numpy(), expected_wte)
    torch.testing.assert_close(
        _hf_logits(config, converted), torch.from_numpy(results[0]["logits"]), rtol=1e-5, atol=1e-5
    )
