"""Fine-tuning under pipeline parallelism (tasks/main.py --task MNLI / RACE with
--pipeline-model-parallel-size 2; slow: TP 2 x PP 2, PP 2 x DP 2, TP 2 x PP 2 with sequence parallelism):
the loss curve, the validation accuracy of every epoch and every final parameter equal the single-process
run (fp32, dropout off, every parameter randomised through the pretrained checkpoint, resharded to the grid
with tools/checkpoint/reshard.py); the accuracy and log lines come from the last rank only; a PP 2
checkpoint (mp_rank_TT_PPP) resumes bitwise (dropout on) and evaluates alone; a pretrained checkpoint of
another layout, or one that lacks weights of one stage only, stops every rank with a clear error; the
interleaved schedule is refused.

SGD, not Adam: Adam divides each gradient by its own running RMS, so a parameter whose exact gradient is
zero (the key bias) moves by about lr in the direction of its rounding noise, which differs with the
summation order of any parallel layout (see tests/test_pipeline_training.py)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from megatron.checkpoint_format import from_megatron_state_dict, get_checkpoint_name, to_megatron_state_dict
from megatron.model.utils import tensor_parallel_dim
from megatron.parallel.state import single_process_state
from tasks import main as tasks_main
from tasks.classification import Classification, MultipleChoice
from tests.distributed_utils import run_distributed
from tests.randomize import randomize_parameters_
from tests.test_tasks_finetune import MODEL, _config, _finetune_argv
from tests.test_tasks_finetune import files as files  # noqa: F401 - the module's fixture, shared
from tools.checkpoint import reshard

LAYERS = 2  # tests.test_tasks_finetune.MODEL
SGD = ("--optimizer", "sgd", "--lr", "0.2", "--lr-warmup-fraction", "0.1", "--log-interval", "1")
DATA = {"MNLI": ("mnli_train.tsv", "mnli_dev.tsv"), "RACE": ("race_train", "race_dev")}


@pytest.fixture(scope="module")
def randomised(files) -> dict:  # noqa: F811
    """The pretrained BERT of `files` with every parameter of the MNLI and RACE models randomised (the
    encoder shared, both heads present: each task loads the one it has), as a release checkpoint at
    TP 1 x PP 1 and resharded to PP 2 and TP 2 x PP 2; the whole models' weights by name."""
    tmp = files["tmp"]
    source = torch.load(
        files["bert"] / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False
    )
    whole: dict[str, torch.Tensor] = {}
    for model in (
        Classification(_config(), single_process_state(), 3),
        MultipleChoice(_config(), single_process_state()),
    ):
        randomize_parameters_(model, seed=17)
        whole.update(model.state_dict())
    path = get_checkpoint_name(str(tmp / "random"), 0, 0, None, release=True)
    os.makedirs(os.path.dirname(path))
    torch.save({"args": source["args"], "checkpoint_version": source["checkpoint_version"], "iteration": 0,
                "model": to_megatron_state_dict(whole)}, path)  # fmt: skip
    (tmp / "random" / "latest_checkpointed_iteration.txt").write_text("release")
    for tp, pp in ((1, 2), (2, 2)):
        reshard.main(["--load", str(tmp / "random"), "--save", str(tmp / f"random_tp{tp}_pp{pp}"),
                      "--target-tensor-model-parallel-size", str(tp), "--target-pipeline-model-parallel-size", str(pp)])  # fmt: skip
    return whole


def _grid(tp: int, pp: int) -> list[str]:
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]


def _finetune(rank: int, world_size: int, files: dict, task: str, argv_extra: list[str], pretrained: str):  # noqa: F811
    """Fine-tune `task` for 2 epochs: (loss of every iteration, accuracy of every epoch, stdout)."""
    train, valid = DATA[task]
    argv = _finetune_argv(files, task, train, valid, 2, *SGD, *argv_extra, pretrained=pretrained)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        summary = tasks_main.main(argv)
    return [step["lm loss"] for step in summary["losses"]], summary["accuracy"], stdout.getvalue()


def _final_params(save: Path, tp: int, pp: int) -> dict[str, torch.Tensor]:
    """Every parameter of the last checkpoint under its whole-model name: stage s's layer i is layer
    s L/pp + i, TP shards concatenated along their split dimension (duplicates checked equal)."""
    iteration = int((save / "latest_checkpointed_iteration.txt").read_text())
    shards: dict[str, list] = {}
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            path = get_checkpoint_name(str(save), iteration, tp_rank, pp_rank if pp > 1 else None)
            assert (pp == 1) == path.endswith(f"mp_rank_{tp_rank:02d}/model_optim_rng.pt"), path
            model = from_megatron_state_dict(torch.load(path, weights_only=False)["model"])
            for key, value in model.items():
                match = re.match(r"language_model\.encoder\.layers\.(\d+)\.(.*)", key)
                if match:
                    key = f"language_model.encoder.layers.{int(match[1]) + pp_rank * LAYERS // pp}.{match[2]}"
                shards.setdefault(key, [None] * tp)[tp_rank] = value
    merged = {}
    for key, parts in shards.items():
        dim = tensor_parallel_dim(key)
        merged[key] = parts[0] if dim is None else torch.cat(parts, dim=dim)
        for part in parts[1:] if dim is None else []:
            assert torch.equal(part, parts[0]), key
    return merged


def _compare(
    files,  # noqa: F811
    randomised: dict,
    task: str,
    grids: list[tuple[int, int, int]],
    tmp: Path,
    extra: tuple[str, ...] = (),
) -> None:
    """Each (tp, pp, dp) grid's run (with the `extra` flags) equals the single-process one: losses (1e-5),
    accuracy of every epoch (exact), every final parameter (1e-5; every one moved 10x beyond that from its
    start); the metric and log lines are printed by the last rank only."""
    reference_losses, reference_accuracy, out = _finetune(
        0, 1, files, task, ["--save", str(tmp / "ref")], "random"
    )
    assert len(reference_accuracy) == 2 and " >> |epoch: 2| overall" in out
    expected = _final_params(tmp / "ref", 1, 1)
    head = "classification_head" if task == "MNLI" else "multichoice_head"
    start = {
        k: v for k, v in randomised.items() if not k.startswith(("classification_head", "multichoice_head"))
    }
    start.update({k: v for k, v in randomised.items() if k.startswith(head)})
    assert set(expected) == set(start)
    for key, value in expected.items():
        if key != "multichoice_head.bias":  # a shift of all choices' scores: its gradient is exactly 0
            assert (value - start[key]).abs().max() > 1e-4, key  # 10x the tolerance: a wrong gradient shows
    for tp, pp, dp in grids:
        save = tmp / f"tp{tp}_pp{pp}_dp{dp}"
        results = run_distributed(
            _finetune, tp * pp * dp, args=(files, task, [*_grid(tp, pp), *extra, "--save", str(save)], f"random_tp{tp}_pp{pp}")
        )  # fmt: skip
        for rank, (losses, accuracy, out) in enumerate(results):
            assert losses == pytest.approx(reference_losses, rel=1e-5), (tp, pp, dp, rank)
            assert accuracy == reference_accuracy, (tp, pp, dp, rank)  # every rank returns the last stage's
            last = rank == tp * pp * dp - 1
            assert (" >> |epoch: 2| overall" in out) == last, (rank, out)
            logged = re.findall(r" iteration +(\d+)/ +\d+ \|", out)  # one log line per iteration
            assert logged == ([str(i + 1) for i in range(len(losses))] if last else []), (rank, out)
        params = _final_params(save, tp, pp)
        assert set(params) == set(expected)
        for key, value in params.items():
            torch.testing.assert_close(
                value, expected[key], rtol=1e-5, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}"
            )


def test_mnli_and_race_pp2_equal_single_process(files, randomised, tmp_path):  # noqa: F811
    _compare(files, randomised, "MNLI", [(1, 2, 1)], tmp_path / "mnli")
    _compare(files, randomised, "RACE", [(1, 2, 1)], tmp_path / "race")


@pytest.mark.slow
def test_mnli_tp2_pp2_and_pp2_dp2_equal_single_process(files, randomised, tmp_path):  # noqa: F811
    _compare(files, randomised, "MNLI", [(2, 2, 1), (1, 2, 2)], tmp_path)


@pytest.mark.slow
def test_race_tp2_pp2_sequence_parallel_equals_single_process(files, randomised, tmp_path):  # noqa: F811
    """Stages send [4 x micro batch, s/t, h]; only the last stage gathers the sequence for the pooler."""
    _compare(files, randomised, "RACE", [(2, 2, 1)], tmp_path, ("--sequence-parallel",))


def _without_pooler(pretrained: Path, out: Path) -> None:
    """A copy of the PP 2 checkpoint `pretrained` whose last stage lacks the pooler (as BERT trained with
    --bert-no-binary-head): only that stage misses weights."""
    shutil.copytree(pretrained, out)
    path = get_checkpoint_name(str(out), 0, 0, 1, release=True)
    state = torch.load(path, weights_only=False)
    model = from_megatron_state_dict(state["model"])
    state["model"] = to_megatron_state_dict({k: v for k, v in model.items() if ".pooler." not in k})
    torch.save(state, path)


def _refused(rank: int, world_size: int, files: dict, pretrained: str) -> tuple[int, str]:  # noqa: F811
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as info:
        _finetune(rank, world_size, files, "MNLI", _grid(1, 2), pretrained)
    return info.value.code, stderr.getvalue()


def _straight_resumed_and_refused(rank: int, world_size: int, files: dict, tmp: str) -> dict:  # noqa: F811
    """At PP 2, dropout on: a 2-epoch MNLI run; the same run resumed from a copy of its checkpoint at the
    end of epoch 1; the final checkpoint evaluated with --epochs 0; then two pretrained checkpoints that must be refused: the PP 1 one, and a PP 2 one
    whose last stage lacks the pooler."""
    dropout = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1", *_grid(1, 2)]
    straight = _finetune(
        rank, world_size, files, "MNLI", [*dropout, "--save", f"{tmp}/straight"], "random_tp1_pp2"
    )
    if rank == 0:  # a run that stopped after epoch 1: its checkpoint of iteration 6 is the latest
        assert sorted(os.listdir(f"{tmp}/straight"))[:2] == ["iter_0000006", "iter_0000012"]
        shutil.copytree(f"{tmp}/straight", f"{tmp}/resumed", ignore=shutil.ignore_patterns("iter_0000012"))
        Path(f"{tmp}/resumed/latest_checkpointed_iteration.txt").write_text("6")
        _without_pooler(files["tmp"] / "random_tp1_pp2", Path(tmp) / "no_pooler")
    torch.distributed.barrier()
    flags = [*dropout, "--load", f"{tmp}/resumed", "--save", f"{tmp}/resumed"]
    resumed = _finetune(rank, world_size, files, "MNLI", flags, "random_tp1_pp2")
    evaluate = ["--task", "MNLI", "--epochs", "0", "--valid-data", str(files["tmp"] / DATA["MNLI"][1]), "--load",
                f"{tmp}/straight", *MODEL, *files["tok"], "--micro-batch-size", "4", *_grid(1, 2)]  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        evaluated = tasks_main.main(evaluate)["accuracy"]
    return {"straight": straight[:2], "resumed": resumed[:2], "evaluated": evaluated,
            "pp1": _refused(rank, world_size, files, "random"),
            "no_pooler": _refused(rank, world_size, files, f"{tmp}/no_pooler")}  # fmt: skip


def test_pp2_checkpoint_resumes_and_bad_pretrained_is_refused(files, randomised, tmp_path):  # noqa: F811
    """The PP 2 checkpoint (mp_rank_00_000, mp_rank_00_001) resumes bitwise: the losses of epoch 2, its
    accuracy and every final parameter; evaluated alone (--epochs 0) it gives the same accuracy. A pretrained checkpoint of another layout names reshard.py; one
    whose last stage lacks the pooler stops both stages (none waits for the other), each with a message."""
    results = run_distributed(_straight_resumed_and_refused, 2, args=(files, str(tmp_path)))
    for rank, result in enumerate(results):
        (losses, accuracy), (resumed_losses, resumed_accuracy) = result["straight"], result["resumed"]
        assert len(losses) == 12 and resumed_losses == losses[6:]
        assert resumed_accuracy == accuracy[1:]
        assert result["evaluated"] == accuracy[1:]  # --epochs 0 --load of the PP 2 checkpoint
        code, err = result["pp1"]
        assert code == 1 and "Traceback" not in err
        assert "was saved with --tensor-model-parallel-size 1 x --pipeline-model-parallel-size 1" in err
        assert "tools/checkpoint/reshard.py" in err and "--target-pipeline-model-parallel-size 2" in err
        code, err = result["no_pooler"]
        lacks = "of another pipeline stage" if rank == 0 else "['language_model.pooler.dense."
        lacks = f"encoder weights {lacks}"
        assert code == 1 and f"--pretrained-checkpoint {tmp_path / 'no_pooler'} lacks {lacks}" in err, err
    straight, resumed = _final_params(tmp_path / "straight", 1, 2), _final_params(tmp_path / "resumed", 1, 2)
    assert set(straight) == set(resumed)
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


@pytest.mark.parametrize(
    "flag",
    [["--virtual-pipeline-model-parallel-size", "2"], ["--num-layers-per-virtual-pipeline-stage", "1"]],
)
def test_interleaved_schedule_is_refused(files, capsys, monkeypatch, flag):  # noqa: F811
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")  # flags are checked before any process group is joined
    argv = _finetune_argv(files, "MNLI", *DATA["MNLI"], 1, "--num-layers", "4", *_grid(1, 2), *flag)
    with pytest.raises(SystemExit) as info:
        tasks_main.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--task MNLI (fine-tuning) does not run the interleaved schedule" in err
    assert "drop --virtual-pipeline-model-parallel-size" in err and "Traceback" not in err
