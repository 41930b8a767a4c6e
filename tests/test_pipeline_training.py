"""Pipeline-parallel training end to end (pretrain_gpt / pretrain_bert): the loss curve and every parameter
after a few steps equal the single-process run (fp32, dropout off, every parameter randomised through a
release checkpoint written per stage), the two copies of the tied embedding stay bitwise equal, the init
does not depend on the layout, and loading a checkpoint of another layout is a clear error.

The parameters are compared after SGD steps: Adam divides each gradient by its own running RMS, so a
parameter whose exact gradient is zero (the key bias: softmax ignores a shift of all scores of a query)
moves by about lr in the direction of its rounding noise, which differs with the summation order of any
parallel layout."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
from pathlib import Path

import pytest
import torch

import pretrain_bert
import pretrain_gpt
from megatron.checkpoint_format import (
    from_megatron_state_dict,
    get_checkpoint_name,
    to_megatron_state_dict,
)
from megatron.model.utils import tensor_parallel_dim
from megatron.parallel.pipeline_layout import global_key, stage_layouts
from tests.distributed_utils import run_distributed
from tests.shared_data import wikitext_gpt_dataset

LAYERS = 4
GPT_ARGS = (
    f"--num-layers {LAYERS} --hidden-size 16 --num-attention-heads 2 --seq-length 16 --max-position-embeddings 16 "
    "--micro-batch-size 2 --global-batch-size 8 --optimizer sgd --lr 0.5 --min-lr 0.05 --lr-decay-style cosine "
    "--lr-warmup-iters 1 --train-iters 4 --log-interval 1 --eval-interval 1000 --eval-iters 1 --seed 7 "
    "--hidden-dropout 0 --attention-dropout 0 --clip-grad 0.5 --make-vocab-size-divisible-by 2"
).split()
MOCK = "--mock-data --tokenizer-type NullTokenizer --vocab-size 120".split()
BERT_ARGS = [*GPT_ARGS, *MOCK]


@pytest.fixture(scope="module")
def wikitext(tmp_path_factory) -> list[str]:
    prefix, tokenizer_flags = wikitext_gpt_dataset(
        tmp_path_factory.mktemp("wikitext"), num_docs=6, vocab_size=300
    )
    cache = tmp_path_factory.mktemp("cache")
    return ["--data-path", prefix, "--split", "80,20,0", "--data-cache-path", str(cache), *tokenizer_flags]


def _grid_flags(grid: dict) -> list[str]:
    flags = [
        "--tensor-model-parallel-size",
        grid.get("tp", 1),
        "--pipeline-model-parallel-size",
        grid.get("pp", 1),
    ]
    if "vp" in grid:
        flags += ["--virtual-pipeline-model-parallel-size", grid["vp"]]
    if "first" in grid:
        flags += ["--decoder-first-pipeline-num-layers", grid["first"]]
    if "last" in grid:
        flags += ["--decoder-last-pipeline-num-layers", grid["last"]]
    if grid.get("zero"):
        flags.append("--use-distributed-optimizer")
    if grid.get("sp"):
        flags.append("--sequence-parallel")
    return [str(f) for f in flags]


def _layouts(grid: dict):
    return stage_layouts(LAYERS, grid.get("pp", 1), grid.get("vp", 1), grid.get("first"), grid.get("last"))


def _is_swiglu_fused(key: str, swiglu: bool) -> bool:
    return swiglu and key.endswith("mlp.dense_h_to_4h.weight")


def _tp_shard(full: torch.Tensor, key: str, tp: int, tp_rank: int, swiglu: bool) -> torch.Tensor:
    """TP rank `tp_rank`'s part of a whole tensor: its chunk along the split dimension, or with SwiGLU's
    fused [gate; up] projection (Megatron's layout) [its gate chunk; its up chunk]."""
    dim = tensor_parallel_dim(key)
    if _is_swiglu_fused(key, swiglu):
        return torch.cat([half.chunk(tp)[tp_rank] for half in full.chunk(2)]).clone()
    return full if dim is None else torch.chunk(full, tp, dim=dim)[tp_rank].clone()


def _tp_merge(parts: list[torch.Tensor], key: str, swiglu: bool) -> torch.Tensor:
    """The inverse of _tp_shard (duplicated tensors: rank 0's copy, the others must equal it)."""
    dim = tensor_parallel_dim(key)
    if _is_swiglu_fused(key, swiglu):
        halves = [part.chunk(2) for part in parts]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])
    if dim is not None:
        return torch.cat(parts, dim=dim)
    for part in parts[1:]:
        assert torch.equal(part, parts[0]), key  # TP duplicates stay identical
    return parts[0]


def _write_release(whole: dict, grid: dict, out: Path, swiglu: bool = False) -> None:
    """The whole model's state split into the grid's shards as a 'release' checkpoint (weights only)."""
    tp = grid.get("tp", 1)
    pp = grid.get("pp", 1)
    untied = "language_model.output_layer.weight" in whole
    for pp_rank, chunks in enumerate(_layouts(grid)):
        for tp_rank in range(tp):
            models = {}
            for index, stage in enumerate(chunks):
                names = {_local(k, stage): k for k in whole if _held(k, stage)}
                if stage.post_process and not stage.pre_process and not untied:
                    names["word_embeddings_for_head.weight"] = (
                        "language_model.embedding.word_embeddings.weight"
                    )
                flat = {}
                for local, key in names.items():
                    flat[local] = _tp_shard(whole[key], key, tp, tp_rank, swiglu)
                    assert global_key(local, stage) == key  # the code's mapping agrees with ours
                models["model" if len(chunks) == 1 else f"model{index}"] = to_megatron_state_dict(flat)
            path = get_checkpoint_name(str(out), 0, tp_rank, pp_rank if pp > 1 else None, release=True)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            args = argparse.Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 0, **models}, path)
    (out / "latest_checkpointed_iteration.txt").write_text("release")


def _local(key: str, stage) -> str:
    """A whole-model key as the stage numbers it: layers.n -> layers.(n - first layer of the stage)."""
    if not key.startswith("language_model.encoder.layers."):
        return key
    number = int(key.split(".")[3])
    return key.replace(f"layers.{number}.", f"layers.{number - stage.layers.start}.", 1)


def _held(key: str, stage) -> bool:
    """Does this chunk hold the whole-model key?"""
    if key.startswith("language_model.encoder.layers."):
        return int(key.split(".")[3]) in stage.layers
    if key.startswith("language_model.embedding."):
        return stage.pre_process
    return stage.post_process  # final layernorm, pooler, BERT heads


def _final_params(
    save_dir: Path, grid: dict, swiglu: bool = False
) -> tuple[dict[str, torch.Tensor], list[tuple]]:
    """Every parameter of the final checkpoint under its whole-model key (TP shards merged), and the pairs
    (first stage's word embedding shard, last stage's word_embeddings_for_head shard)."""
    tp = grid.get("tp", 1)
    pp = grid.get("pp", 1)
    iteration = int((save_dir / "latest_checkpointed_iteration.txt").read_text())
    shards: dict[str, list] = {}
    tied: dict[int, list] = {}
    for pp_rank, chunks in enumerate(_layouts(grid)):
        for tp_rank in range(tp):
            path = get_checkpoint_name(str(save_dir), iteration, tp_rank, pp_rank if pp > 1 else None)
            state = torch.load(path, map_location="cpu", weights_only=False)
            for index, stage in enumerate(chunks):
                flat = from_megatron_state_dict(state["model" if len(chunks) == 1 else f"model{index}"])
                for key, value in flat.items():
                    if key == "word_embeddings_for_head.weight":
                        tied.setdefault(tp_rank, []).append(value)
                        continue
                    if key == "language_model.embedding.word_embeddings.weight" and pp > 1:
                        tied.setdefault(tp_rank, []).insert(0, value)
                    shards.setdefault(global_key(key, stage), [None] * tp)[tp_rank] = value
    merged = {key: _tp_merge(parts, key, swiglu) for key, parts in shards.items()}
    return merged, [tuple(pair) for pair in tied.values() if len(pair) == 2]  # untied: no pairs


def _run(rank: int, world_size: int, module_name: str, argv: list[str]) -> tuple[list[dict], list[float]]:
    """The losses of every iteration, then the final validation losses (evaluation goes through the
    schedule too); and the grad norm and params norm of each log line this rank printed (last stage)."""
    module = pretrain_gpt if module_name == "gpt" else pretrain_bert
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        summary = module.main(argv)
    assert summary["valid"], "the test needs a validation split"
    norms = [
        float(value)
        for line in stdout.getvalue().splitlines()
        if "grad norm:" in line
        for value in re.search(r"grad norm: (\S+) \| params norm: (\S+) \|", line).groups()
    ]
    return [*summary["losses"], summary["valid"]], norms


def _randomised_whole(
    module_name: str, data_flags: list[str], tmp: Path, extra: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """The single-process model's weights after init (the model `extra` flags shape), every parameter
    perturbed."""
    module = pretrain_gpt if module_name == "gpt" else pretrain_bert
    base = GPT_ARGS if module_name == "gpt" else BERT_ARGS
    module.main([*base, *data_flags, *extra, "--train-iters", "1", "--lr", "0", "--min-lr", "0", "--lr-warmup-iters", "0",
                 "--save", str(tmp / "init")])  # fmt: skip
    params, _ = _final_params(tmp / "init", {})
    gen = torch.Generator().manual_seed(3)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in params.items()}


def _compare_with_single_process(
    module_name: str, data_flags: list[str], grids: list[dict], tmp: Path, extra: tuple[str, ...] = ()
) -> None:
    """Each grid's run equals the single-process one: losses (1e-5), the logged grad and params norms (as
    printed, 3 decimals: each parameter counted once), every final parameter (1e-5), tied copies bitwise.
    `extra` flags go to every run (the model's shape too: --swiglu shards [gate; up] per TP rank,
    --untie-embeddings-and-output-weights has no tied copies); a grid with "zero" adds
    --use-distributed-optimizer, "sp" --sequence-parallel."""
    base = [*(GPT_ARGS if module_name == "gpt" else BERT_ARGS), "--log-params-norm", *extra]
    swiglu, untied = "--swiglu" in extra, "--untie-embeddings-and-output-weights" in extra
    whole = _randomised_whole(module_name, data_flags, tmp, extra)
    _write_release(whole, {}, tmp / "start_1")
    reference, reference_norms = _run(
        0, 1, module_name, [*base, *data_flags, "--load", str(tmp / "start_1"), "--save", str(tmp / "ref")]
    )
    assert len(reference_norms) == 2 * (len(reference) - 1)
    expected, _ = _final_params(tmp / "ref", {})
    for n, grid in enumerate(grids):
        world = grid.get("tp", 1) * grid.get("pp", 1) * grid.get("dp", 1)
        start, out = tmp / f"start_{n}_{world}", tmp / f"run_{n}"
        _write_release(whole, grid, start, swiglu)
        argv = [*base, *data_flags, *_grid_flags(grid), "--load", str(start), "--save", str(out)]
        results = run_distributed(_run, world, args=(module_name, argv))
        logged = [norms for _, norms in results if norms]
        assert logged, grid  # the last stage prints the log lines
        for norms in logged:
            assert norms == pytest.approx(reference_norms, abs=2e-3), (grid, norms, reference_norms)
        for curve, _ in results:  # every rank reports the last stage's losses
            assert len(curve) == len(reference)
            for got, want in zip(curve, reference):
                for name in want:
                    assert got[name] == pytest.approx(want[name], rel=1e-5), (grid, name, got, want)
        params, tied = _final_params(out, grid, swiglu)
        assert set(params) == set(expected), grid
        for key, value in params.items():
            torch.testing.assert_close(
                value, expected[key], rtol=1e-5, atol=1e-7, msg=lambda m, k=key, g=grid: f"{g} {k}: {m}"
            )
        for first, last in tied:
            assert torch.equal(first, last), grid  # the two copies of the tied embedding stay bitwise equal
        assert len(tied) == (grid.get("tp", 1) if grid.get("pp", 1) > 1 and not untied else 0)


def test_gpt_pp2_tp2_pp2_pp2_dp2_equal_single_process(wikitext, tmp_path):
    _compare_with_single_process(
        "gpt", wikitext, [{"pp": 2}, {"tp": 2, "pp": 2}, {"pp": 2, "dp": 2}], tmp_path
    )


@pytest.mark.slow
def test_gpt_virtual_and_uneven_stages_equal_single_process(wikitext, tmp_path):
    grids = [{"pp": 2, "vp": 2}, {"pp": 2, "first": 1, "last": 3}]
    _compare_with_single_process("gpt", wikitext, grids, tmp_path)


@pytest.mark.slow
def test_gpt_pp4_and_tp2_pp2_dp2_equal_single_process(wikitext, tmp_path):
    _compare_with_single_process("gpt", wikitext, [{"pp": 4}, {"tp": 2, "pp": 2, "dp": 2}], tmp_path)


# Adam (the distributed optimizer shards Adam only) with eps 1e-5: see tests/training_compare.py ADAM_EPS.
ADAM = ("--optimizer", "adam", "--adam-eps", "1e-5", "--lr", "0.01", "--min-lr", "0.001")


def test_gpt_pp2_dp2_distributed_optimizer_equals_single_process(wikitext, tmp_path):
    """The tied embedding's copies are summed over the embedding group before the DP reduce-scatter."""
    _compare_with_single_process("gpt", wikitext, [{"pp": 2, "dp": 2, "zero": True}], tmp_path, ADAM)


def test_gpt_tp2_pp2_sequence_parallel_equals_single_process(wikitext, tmp_path):
    """Stages send s/t of the sequence; only the last stage gathers it."""
    _compare_with_single_process("gpt", wikitext, [{"tp": 2, "pp": 2, "sp": True}], tmp_path)


@pytest.mark.slow
def test_gpt_tp2_pp2_dp2_distributed_optimizer_and_sequence_parallel_equal_single_process(wikitext, tmp_path):
    grids = [{"tp": 2, "pp": 2, "dp": 2, "zero": True}, {"tp": 2, "pp": 2, "dp": 2, "zero": True, "sp": True}]
    _compare_with_single_process("gpt", wikitext, grids, tmp_path, ADAM)


def _lm_losses(rank: int, world_size: int, argv: list[str]) -> list[float]:
    return [step["lm loss"] for step in pretrain_gpt.main(argv)["losses"]]


@pytest.mark.slow
def test_pp2_dp2_distributed_optimizer_resumes_bitwise_and_at_dp1(wikitext, tmp_path):
    """With dropout on, a PP 2 x DP 2 run saved at iteration 2 (distrib_optim.pt in each mp_rank_00_PPP)
    resumes bitwise. With dropout off (masks are drawn per DP rank), such a checkpoint resumes at
    PP 2 x DP 1 without the flag to the same curve."""
    base = [*GPT_ARGS, *wikitext, *ADAM, *_grid_flags({"pp": 2, "zero": True})]
    for dropout in ("0.1", "0"):
        argv = [*base, "--hidden-dropout", dropout, "--attention-dropout", dropout]
        straight = run_distributed(_lm_losses, 4, args=(argv,))[0]
        ckpt = str(tmp_path / f"ckpt_{dropout}")
        first = run_distributed(_lm_losses, 4, args=([*argv, "--exit-interval", "2", "--save", ckpt],))[0]
        for stage in ("000", "001"):
            assert os.path.isfile(
                os.path.join(ckpt, "iter_0000002", f"mp_rank_00_{stage}", "distrib_optim.pt")
            )
        if dropout != "0":
            assert first + run_distributed(_lm_losses, 4, args=([*argv, "--load", ckpt],))[0] == straight
        else:
            plain = [a for a in argv if a != "--use-distributed-optimizer"]
            at_dp1 = run_distributed(_lm_losses, 2, args=([*plain, "--load", ckpt],))[0]
            assert first + at_dp1 == pytest.approx(straight, rel=1e-5)


@pytest.mark.slow
def test_bert_pp2_equals_single_process(tmp_path):
    _compare_with_single_process("bert", [], [{"pp": 2}], tmp_path)


def test_bert_tp2_pp2_sequence_parallel_equals_single_process(tmp_path):
    """BERT at TP 2 x PP 2 with --sequence-parallel: the stages send s/t of the sequence, the last stage
    gathers it for the pooler and the heads (the pooler's first token and the LM head's positions), and
    the binary head, pooler and LM head (split over the vocabulary) sit on the last stage only. The mock
    vocabulary (121 tokens) is padded to a multiple of 8 so that TP 1 and TP 2 pad it alike (128)."""
    vocab = ("--make-vocab-size-divisible-by", "8")
    _compare_with_single_process("bert", [], [{"tp": 2, "pp": 2, "sp": True}], tmp_path, vocab)


def _init_and_wrong_layout(rank: int, world_size: int, data_flags: list[str], tmp: str) -> tuple[list, str]:
    losses = pretrain_gpt.main(
        [*GPT_ARGS, *data_flags, "--pipeline-model-parallel-size", "2", "--save", tmp + "/pp2"]
    )
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit):
        pretrain_gpt.main(
            [*GPT_ARGS, *data_flags, "--tensor-model-parallel-size", "2", "--load", tmp + "/pp2"]
        )
    return losses["losses"], stderr.getvalue()


def test_init_does_not_depend_on_layout_and_other_layout_is_refused(wikitext, tmp_path):
    reference = pretrain_gpt.main([*GPT_ARGS, *wikitext])["losses"]
    for losses, error in run_distributed(_init_and_wrong_layout, 2, args=(wikitext, str(tmp_path))):
        for got, want in zip(losses, reference):
            assert got["lm loss"] == pytest.approx(want["lm loss"], rel=1e-5)
        assert (
            "--tensor-model-parallel-size 1 x --pipeline-model-parallel-size 2 but this run uses 2 x 1"
            in error
        )
        assert "tools/checkpoint/reshard.py" in error and "Traceback" not in error


def _diverge(rank: int, world_size: int) -> tuple[int, str]:
    argv = [*GPT_ARGS, *MOCK, "--pipeline-model-parallel-size", "2", "--train-iters", "30", "--lr", "1e38",
            "--min-lr", "1e37", "--clip-grad", "0", "--max-nan-iterations", "3"]  # fmt: skip
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as info:
        pretrain_gpt.main(argv)
    return info.value.code, stderr.getvalue()


def test_nan_iterations_stop_every_stage_together():
    """The last stage's NaN losses reach every stage (and found-inf is reduced over TP x PP): all stages
    count the same bad iterations and stop at the same one with the same message, none waits forever."""
    results = run_distributed(_diverge, 2)
    assert [code for code, _ in results] == [1, 1]
    messages = [
        next(line for line in err.splitlines() if "consecutive iterations" in line) for _, err in results
    ]
    assert messages[0] == messages[1] and "Traceback" not in results[0][1] + results[1][1]
