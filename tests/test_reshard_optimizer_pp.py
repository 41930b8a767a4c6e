"""tools/checkpoint/reshard.py --keep-optimizer across pipeline layouts: the optimizer state of the plain
and of the distributed optimizer follows its parameters between any TP x PP layouts (round trips bitwise,
values placed where an independent slicing puts them), and training resumed from a resharded checkpoint
continues the loss curve of the uninterrupted run."""

from __future__ import annotations

import argparse
import shutil
import zlib
from functools import partial
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

import pretrain_bert
import pretrain_gpt
from megatron.checkpoint_format import from_megatron_state_dict, get_checkpoint_name
from megatron.parallel.pipeline_layout import global_key
from megatron.parallel.state import ParallelState
from megatron.run_state import RunState
from megatron.training import pretrain
from tests.distributed_utils import run_distributed
from tests.training_compare import ADAM_EPS, NO_DROPOUT, TINY, assert_curves_close
from tools.checkpoint import reshard
from tools.checkpoint.optimizer_state import _same, optimizer_param_names

SAVED, TOTAL = 3, 6  # the run saves at SAVED and goes on to TOTAL
BASE = [*TINY, *NO_DROPOUT, *ADAM_EPS, "--num-layers", 4, "--global-batch-size", 8, "--train-iters", TOTAL]
TP2_PP2 = ["--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2]
ZERO = ["--use-distributed-optimizer"]
LLAMA = (  # SwiGLU, grouped-query attention (2 groups) and an untied output layer on the last stage
    "--position-embedding-type rope --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --ffn-hidden-size 64 "
    "--group-query-attention --num-query-groups 2 --untie-embeddings-and-output-weights --disable-bias-linear"
).split()
WORD = "language_model.embedding.word_embeddings.weight"
HEAD = "word_embeddings_for_head.weight"
DISTRIB = "distrib_optim.pt"


@torch.no_grad()
def _randomise_by_global_name(model: nn.Module, parallel: ParallelState) -> None:
    """Every parameter N(mean, 0.05^2) from a generator seeded by its whole-model name (and TP rank when it
    is split), so that the weights do not depend on PP and the head copy of the tied embedding equals the
    first stage's embedding, as training keeps them."""
    stage = model.language_model.stage
    for name, param in model.named_parameters():
        split = bool(getattr(param, "tensor_model_parallel", False))
        seed = zlib.crc32(global_key(name, stage).encode()) + (1000 * parallel.tp_rank if split else 0)
        values = torch.randn(param.shape, generator=torch.Generator().manual_seed(seed))
        param.copy_(0.05 * values + (1.0 if "layernorm.weight" in name else 0.0))


def _provider(
    module: ModuleType, args: argparse.Namespace, parallel: ParallelState, run: RunState, stage=None
) -> nn.Module:
    model = module.model_provider(args, parallel, run, stage=stage)
    _randomise_by_global_name(model, parallel)
    return model


def _train(argv: list, model: str = "gpt") -> list[float]:
    """The losses of every iteration of the randomised GPT (lm loss) or BERT (lm loss, sop loss)."""
    module = pretrain_bert if model == "bert" else pretrain_gpt
    summary = pretrain(module.train_valid_test_datasets_provider, partial(_provider, module), module.forward_step,
                       args_defaults={"tokenizer_type": "GPT2BPETokenizer"}, argv=[str(a) for a in argv])  # fmt: skip
    return [step[key] for step in summary["losses"] for key in sorted(step) if key.endswith(" loss")]


def _model(variant: str) -> str:
    return "bert" if variant.startswith("bert") else "gpt"


def _after_saved(curve: list[float]) -> list[float]:
    """The losses of the iterations after SAVED (one or more per iteration)."""
    return curve[len(curve) * SAVED // TOTAL :]


def _train_variants(rank: int, world_size: int, root: str, grid: list, variants: dict) -> dict:
    """Each variant trained TOTAL iterations at `grid`, saving at SAVED (and at the end)."""
    return {
        name: _train(
            [*BASE, *grid, *extra, "--save", f"{root}/{name}", "--save-interval", SAVED], _model(name)
        )
        for name, extra in variants.items()
    }


def _at_saved_iteration(source: Path, copy_to: Path) -> Path:
    """A copy of the checkpoint folder whose tracker names iteration SAVED (an earlier save, as a user picks
    it)."""
    shutil.copytree(source, copy_to)
    (copy_to / "latest_checkpointed_iteration.txt").write_text(str(SAVED))
    return copy_to


@pytest.fixture(scope="module")
def tp2_pp2(tmp_path_factory) -> tuple[Path, dict]:
    """The plain- and the distributed-optimizer run of GPT and the plain one of a Llama-shaped GPT at
    TP 2 x PP 2, their checkpoints at SAVED."""
    root = tmp_path_factory.mktemp("tp2pp2")
    variants = {"plain": [], "zero": ZERO, "llama": LLAMA}
    curves = run_distributed(_train_variants, 4, args=(str(root), TP2_PP2, variants))[-1]
    for name in curves:
        _at_saved_iteration(root / name, root / f"{name}_at_{SAVED}")
    return root, curves


def _reshard(source: Path, target: Path, tp: int, pp: int) -> Path:
    reshard.main(["--load", str(source), "--save", str(target), "--target-tensor-model-parallel-size", str(tp),
                  "--target-pipeline-model-parallel-size", str(pp), "--keep-optimizer"])  # fmt: skip
    return target


def _file(save: Path, tp: int, pp, name: str = "model_optim_rng.pt") -> dict:
    path = Path(get_checkpoint_name(str(save), SAVED, tp, pp)).parent / name
    return torch.load(path, map_location="cpu", weights_only=False)


# --------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("variant", ["plain", "zero", "llama"])
def test_round_trip_tp2_pp2_to_tp1_pp1_and_back_is_bitwise(tp2_pp2, tmp_path, variant):
    root, _ = tp2_pp2
    source = root / f"{variant}_at_{SAVED}"
    whole = _reshard(source, tmp_path / "tp1pp1", 1, 1)
    back = _reshard(whole, tmp_path / "back", 2, 2)
    for tp in range(2):
        for pp in range(2):
            before, after = _file(source, tp, pp), _file(back, tp, pp)
            for key in ("model", "optimizer", "opt_param_scheduler", "iteration"):
                assert _same(after[key], before[key]), (tp, pp, key)
            written_by = {"rank"}  # the global rank that wrote the file: the tool's args are TP rank 0's
            assert {k: v for k, v in vars(after["args"]).items() if k not in written_by} == {
                k: v for k, v in vars(before["args"]).items() if k not in written_by
            }
            if variant == "zero":
                assert _same(_file(back, tp, pp, DISTRIB), _file(source, tp, pp, DISTRIB)), (tp, pp)


@pytest.mark.parametrize("variant", ["plain", "zero"])
def test_resharding_to_the_same_layout_keeps_every_stage_file(tp2_pp2, tmp_path, variant):
    """TP 2 x PP 2 -> TP 2 x PP 2 keeps each stage's own RNG states too, so even a run with dropout resumes
    as it would from the source."""
    root, _ = tp2_pp2
    source = root / f"{variant}_at_{SAVED}"
    same = _reshard(source, tmp_path / "same", 2, 2)
    for tp in range(2):
        for pp in range(2):
            before, after = _file(source, tp, pp), _file(same, tp, pp)
            for key in ("model", "optimizer", "opt_param_scheduler", "rng_state", "iteration"):
                assert _same(after[key], before[key]), (tp, pp, key)
    assert not _same(_file(source, 0, 0)["rng_state"], _file(source, 0, 1)["rng_state"])  # stages differ


def _stage_state_by_name(save: Path, tp: int, pp: int) -> dict[str, dict]:
    """{parameter name: Adam entry} of one stage of a plain-optimizer checkpoint, independently of the
    tools: names from the stage's own model in its optimizer's group order."""
    state = _file(save, tp, pp)
    names = [n for group in optimizer_param_names(from_megatron_state_dict(state["model"])) for n in group]
    return {names[i]: entry for i, entry in state["optimizer"]["state"].items()}


def test_merged_optimizer_state_holds_each_stage_and_rank_slice(tp2_pp2, tmp_path):
    """At TP 1 x PP 1 the Adam moments of a layer of stage 1 (local layer 1 = global layer 3) are the two TP
    ranks' concatenated along the split dimension; the word embedding's are stage 0's vocabulary slices,
    and the head copy's on stage 1 equal them; a duplicated layernorm is every rank's."""
    root, _ = tp2_pp2
    whole = _reshard(root / f"plain_at_{SAVED}", tmp_path / "tp1pp1", 1, 1)
    merged = _stage_state_by_name(whole, 0, None)
    assert not any(name.startswith("word_embeddings_for_head") for name in merged)
    stage0 = [_stage_state_by_name(root / f"plain_at_{SAVED}", tp, 0) for tp in range(2)]
    stage1 = [_stage_state_by_name(root / f"plain_at_{SAVED}", tp, 1) for tp in range(2)]
    qkv = "language_model.encoder.layers.{}.self_attention.query_key_value.weight"
    dense = "language_model.encoder.layers.{}.self_attention.dense.weight"
    norm = "language_model.encoder.layers.{}.input_layernorm.weight"
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(merged[qkv.format(3)][key], torch.cat([s[qkv.format(1)][key] for s in stage1]))
        assert torch.equal(
            merged[dense.format(3)][key], torch.cat([s[dense.format(1)][key] for s in stage1], 1)
        )
        assert torch.equal(merged[WORD][key], torch.cat([s[WORD][key] for s in stage0]))
        assert merged[WORD][key].abs().sum() > 0
        for tp in range(2):
            assert torch.equal(stage1[tp][HEAD][key], stage0[tp][WORD][key])
            assert torch.equal(merged[norm.format(2)][key], stage1[tp][norm.format(0)][key])


def _refused(source: Path, target: Path) -> str:
    with pytest.raises(SystemExit) as info:
        _reshard(source, target, 1, 1)
    assert not target.exists()  # nothing half-written
    return str(info.value)


def test_missing_or_foreign_stage_optimizer_state_is_a_clear_error(tp2_pp2, tmp_path):
    root, _ = tp2_pp2
    zero = Path(shutil.copytree(root / f"zero_at_{SAVED}", tmp_path / "zero"))
    missing = Path(get_checkpoint_name(str(zero), SAVED, 1, 1)).parent / DISTRIB
    missing.unlink()
    assert f"{missing} not found" in _refused(zero, tmp_path / "out")

    plain = Path(shutil.copytree(root / f"plain_at_{SAVED}", tmp_path / "plain"))
    path = get_checkpoint_name(str(plain), SAVED, 0, 1)
    state = torch.load(path, weights_only=False)
    state["optimizer"]["param_groups"][0]["params"].pop()  # one parameter short of the stage's model
    torch.save(state, path)
    message = _refused(plain, tmp_path / "out")
    assert "stage 1" in message and "param groups" in message and "--keep-optimizer" in message


# ------------------------------------------------------------------------------------- continued training


def _continue(rank: int, world_size: int, argv: list, model: str = "gpt") -> list[float]:
    return _train(argv, model)


@pytest.mark.parametrize(
    "variant, tp, pp",
    [
        ("plain", 1, 2),
        ("zero", 1, 1),
        pytest.param("plain", 1, 1, marks=pytest.mark.slow),
        pytest.param("zero", 1, 4, marks=pytest.mark.slow),
        pytest.param("llama", 1, 1, marks=pytest.mark.slow),
        pytest.param("llama", 2, 4, marks=pytest.mark.slow),
    ],
)
def test_training_resumed_from_a_resharded_checkpoint_continues_the_curve(tp2_pp2, tmp_path, variant, tp, pp):
    """Saved at TP 2 x PP 2, resharded to TP x PP with the optimizer state, the run goes on as the
    uninterrupted one did (fp32, dropout off)."""
    root, curves = tp2_pp2
    target = _reshard(root / f"{variant}_at_{SAVED}", tmp_path / "target", tp, pp)
    grid = ["--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp]
    flags = {"plain": [], "zero": ZERO, "llama": LLAMA}[variant]
    argv = [*BASE, *grid, *flags, "--load", target]
    for resumed in run_distributed(_continue, tp * pp, args=(argv,)):
        assert_curves_close(resumed, _after_saved(curves[variant]), rtol=1e-5)


# ------------------------------------------------- mixed precision, interleaved and uneven source stages

PP2_VARIANTS = {
    "fp16": ["--fp16", "--initial-loss-scale", 128],
    "bf16_zero": ["--bf16", *ZERO],
    "interleaved": ["--num-layers-per-virtual-pipeline-stage", 1],  # 2 chunks per stage: model0, model1
    "uneven_zero": ["--decoder-first-pipeline-num-layers", 1, *ZERO],  # stages of 1 and 3 layers
    "bert": [],  # BERT: LM head, pooler and binary head on the last stage, tied word_embeddings_for_head
}


@pytest.fixture(scope="module")
def pp2(tmp_path_factory) -> tuple[Path, dict]:
    """The PP2_VARIANTS trained at TP 1 x PP 2, their checkpoints at SAVED."""
    root = tmp_path_factory.mktemp("pp2")
    pp2_grid = ["--pipeline-model-parallel-size", 2]
    curves = run_distributed(_train_variants, 2, args=(str(root), pp2_grid, PP2_VARIANTS))[-1]
    for name in curves:
        _at_saved_iteration(root / name, root / f"{name}_at_{SAVED}")
    return root, curves


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp16", "bf16_zero", "bert"])
def test_mixed_precision_and_bert_state_round_trips_bitwise(pp2, tmp_path, variant):
    """fp32 main params, moments and the fp16 loss scaler, and BERT's state: PP 2 -> TP 2 x PP 1 -> PP 2 is
    bitwise."""
    root, _ = pp2
    source = root / f"{variant}_at_{SAVED}"
    middle = _reshard(source, tmp_path / "tp2", 2, 1)
    back = _reshard(middle, tmp_path / "back", 1, 2)
    for pp in range(2):
        before, after = _file(source, 0, pp), _file(back, 0, pp)
        assert _same(after["model"], before["model"]) and _same(after["optimizer"], before["optimizer"]), pp
        if variant == "bf16_zero":
            assert _same(_file(back, 0, pp, DISTRIB), _file(source, 0, pp, DISTRIB)), pp
    if variant == "fp16":
        scaler = _file(source, 0, 0)["optimizer"]["grad_scaler"]
        for tp in range(2):
            state = _file(middle, tp, None)["optimizer"]
            assert state["grad_scaler"] == scaler
            masters = [t for group in state["fp32_from_fp16_params"] for t in group]
            assert masters and all(t.dtype == torch.float32 for t in masters)


@pytest.mark.slow
@pytest.mark.parametrize(
    "variant, tp, pp, rtol",
    [
        ("interleaved", 1, 4, 1e-5),
        ("uneven_zero", 2, 1, 1e-5),
        ("fp16", 1, 1, 1e-4),
        ("bf16_zero", 1, 1, 2e-4),
        ("bert", 1, 1, 1e-5),
    ],
)
def test_resume_from_interleaved_uneven_mixed_precision_and_bert_sources(
    pp2, tmp_path, variant, tp, pp, rtol
):
    """Saved at PP 2 with virtual stages / an uneven split / fp16 / bf16 / as BERT, resharded with the
    optimizer state, the run continues the uninterrupted curve: 1e-5 in fp32; in half precision within a
    tolerance that the same checkpoint resumed with fresh optimizer state (--no-load-optim) misses by a
    factor 5."""
    root, curves = pp2
    target = _reshard(root / f"{variant}_at_{SAVED}", tmp_path / "target", tp, pp)
    grid = ["--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp]
    flags = [f for f in PP2_VARIANTS[variant] if f in ("--fp16", "--bf16", *ZERO)]
    argv = [*BASE, *grid, *flags, "--load", target]
    if "--fp16" in flags or "--bf16" in flags:
        fresh = run_distributed(_continue, tp * pp, args=([*argv, "--no-load-optim"], _model(variant)))[-1]
        want = _after_saved(curves[variant])
        assert max(abs(f - w) / abs(w) for f, w in zip(fresh, want)) > 5 * rtol
    for resumed in run_distributed(_continue, tp * pp, args=(argv, _model(variant))):
        assert_curves_close(resumed, _after_saved(curves[variant]), rtol=rtol)
