"""Flag validation: every inconsistency is a clean error naming the flags (exit 2, no traceback)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.arguments import parse_args, transformer_config_from_args
from megatron.arguments.compat import UNSUPPORTED
from megatron.microbatches import MicroBatchCalculator

ROOT = Path(__file__).resolve().parents[1]
BASE = (
    "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 32 --micro-batch-size 2 "
    "--train-iters 10 --lr 1e-3 --mock-data --tokenizer-type NullTokenizer --vocab-size 100"
).split()


def _error(capsys, argv, world_size=1) -> str:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, world_size=world_size)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_valid_args_derive_defaults():
    args = parse_args(BASE + ["--tensor-model-parallel-size", "2"], world_size=4)
    assert args.data_parallel_size == 2
    assert args.global_batch_size == 2 * 2
    assert args.ffn_hidden_size == 256 and args.kv_channels == 16
    assert args.max_position_embeddings == 32
    assert args.params_dtype == torch.float32
    args.padded_vocab_size = 128
    config = transformer_config_from_args(args)
    assert config.num_layers == 2 and config.padded_vocab_size == 128


@pytest.mark.parametrize(
    "extra, world, needle",
    [
        (
            ["--tensor-model-parallel-size", "4"],
            2,
            "--tensor-model-parallel-size 4 is larger than the world size 2",
        ),
        (
            ["--tensor-model-parallel-size", "2"],
            3,
            "world size 3 is not divisible by --tensor-model-parallel-size 2",
        ),
        (["--tensor-model-parallel-size", "8"], 8, "--num-attention-heads 4 is not divisible by"),
        (["--num-attention-heads", "3"], 1, "--hidden-size 64 is not divisible by --num-attention-heads 3"),
        (["--global-batch-size", "5"], 2, "--global-batch-size 5 is not a multiple of --micro-batch-size 2"),
        (["--fp16", "--bf16"], 1, "--fp16 and --bf16 are mutually exclusive"),
        (["--loss-scale", "128"], 1, "--loss-scale only applies with --fp16"),
        (["--train-samples", "100"], 1, "--train-iters or --train-samples, not both"),
        (["--max-position-embeddings", "16"], 1, "--seq-length 32 exceeds --max-position-embeddings 16"),
        (["--data-path", "a_text_document"], 1, "--data-path and --mock-data are mutually exclusive"),
        (
            ["--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "3"],
            1,
            "--lr-warmup-fraction cannot be combined",
        ),
        (["--save-interval", "5"], 1, "--save-interval needs --save"),
        (["--split", "a,b"], 1, "--split 'a,b' must be comma-separated numbers"),
        (["--hidden-dropout", "1.5"], 1, "--hidden-dropout must be in [0, 1)"),
        (
            ["--num-layers", "3", "--pipeline-model-parallel-size", "2"],
            2,
            "--num-layers (3) is not divisible",
        ),
        (
            ["--pipeline-model-parallel-size", "4"],
            4,
            "--pipeline-model-parallel-size 4 is larger than --num-layers 2",
        ),
        (
            [
                "--num-layers",
                "4",
                "--pipeline-model-parallel-size",
                "2",
                "--virtual-pipeline-model-parallel-size",
                "4",
            ],
            2,
            "--num-layers 4 is not divisible by --pipeline-model-parallel-size 2 x virtual stages 4",
        ),
        (
            [
                "--num-layers",
                "4",
                "--pipeline-model-parallel-size",
                "2",
                "--num-layers-per-virtual-pipeline-stage",
                "1",
                "--global-batch-size",
                "6",
            ],
            2,
            "to be a multiple of --pipeline-model-parallel-size 2",
        ),
        (
            ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
            6,
            "world size 6 is not divisible by --tensor-model-parallel-size 2 x --pipeline-model-parallel-size 2",
        ),
        (
            [
                "--num-layers",
                "4",
                "--pipeline-model-parallel-size",
                "2",
                "--decoder-first-pipeline-num-layers",
                "3",
                "--decoder-last-pipeline-num-layers",
                "2",
            ],
            2,
            "leave -1 of --num-layers 4 for the other 0 stage(s)",
        ),
        (["--min-lr", "1.0"], 1, "--min-lr 1.0 is larger than --lr"),
        (["--lr-warmup-iters", "10"], 1, "--lr-warmup-iters 10 must be smaller than --lr-decay-iters"),
    ],
)
def test_inconsistent_flags_are_named(capsys, extra, world, needle):
    assert needle in _error(capsys, BASE + extra, world)


def test_missing_required(capsys):
    argv = [a for a in BASE if a not in ("--lr", "1e-3")]
    assert "--lr is required" in _error(capsys, argv)
    argv = [a for a in BASE if a != "--mock-data"]
    assert "give --data-path" in _error(capsys, argv)
    argv = BASE[:-4]
    assert "--tokenizer-type is required" in _error(capsys, argv)
    argv = BASE[:-2] + ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "v.json"]
    assert "needs --merge-file" in _error(capsys, argv)


def test_data_path_pairs(capsys, tmp_path):
    argv = [a for a in BASE if a != "--mock-data"]
    assert "takes pairs" in _error(capsys, argv + ["--data-path", "0.5", "a", "0.5"])
    assert "expected a weight, got 'a'" in _error(capsys, argv + ["--data-path", "a", "b"])
    a, b = str(tmp_path / "a_text_document"), str(tmp_path / "b_text_document")
    for name in (a + ".bin", a + ".idx", b + ".bin"):
        open(name, "wb").close()
    message = _error(capsys, argv + ["--data-path", "0.3", a, "0.7", b])
    assert f"--data-path {b}: no {b}.idx" in message
    open(b + ".idx", "wb").close()
    args = parse_args(argv + ["--data-path", "0.3", a, "0.7", b])
    assert args.data_path == ["0.3", a, "0.7", b]


def test_rampup_batch_size():
    args = parse_args(
        [a for a in BASE if a not in ("--train-iters", "10")]
        + ["--train-samples", "1000", "--global-batch-size", "16", "--rampup-batch-size", "4", "4", "300"],
        world_size=2,
    )
    calc = MicroBatchCalculator(16, 2, 2, args.rampup_batch_size)
    sizes = []
    for consumed in (0, 99, 100, 199, 200, 299, 300, 10_000):
        calc.update(consumed)
        sizes.append(calc.current_global_batch_size)
    assert sizes == [4, 4, 8, 8, 12, 12, 16, 16]
    calc.update(0)
    assert calc.num_micro_batches == 1


def test_cli_error_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_gpt.py"), *BASE, "--fp16", "--bf16"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "--fp16 and --bf16 are mutually exclusive" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_error_is_one_line_and_a_pointer_to_help():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_gpt.py"), *BASE, "--no-such-flag"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines == [
        "pretrain_gpt.py: error: unrecognized arguments: --no-such-flag",
        "(see pretrain_gpt.py --help)",
    ]


def test_help_is_grouped():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pretrain_gpt.py"), "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0
    for group in ("network size:", "training:", "learning rate:", "checkpointing:", "mixed precision:"):
        assert group in proc.stdout


def test_megatron_launch_script_flags_are_accepted(capsys):
    """Implementation-choice flags of Megatron-LM's example scripts parse; the note names them."""
    extra = "--data-impl mmap --DDP-impl local --no-masked-softmax-fusion --use-flash-attn --checkpoint-activations"
    args = parse_args(BASE + extra.split())
    assert args.recompute_granularity == "full"  # older Megatron's --checkpoint-activations
    out = capsys.readouterr().out
    assert "no effect here" in out and "--data-impl" in out and "--no-masked-softmax-fusion" in out


def test_old_megatron_spellings_are_taken_as_current_flags(capsys):
    """Flags of Megatron-LM's old example scripts (pretrain_gpt2.sh, 2020-2022) run, with one note."""
    at = BASE.index("--micro-batch-size")
    old = BASE[:at] + BASE[at + 2 :]
    old += "--batch-size 4 --model-parallel-size 2 --warmup .01 --override-lr-scheduler".split()
    old += "--activations-checkpoint-method uniform --activations-checkpoint-num-layers 1".split()
    old += "--distribute-checkpointed-activations --no-contiguous-buffers-in-local-ddp".split()
    args = parse_args(old, world_size=2)
    assert (
        args.micro_batch_size == 4 and args.tensor_model_parallel_size == 2 and args.data_parallel_size == 1
    )
    assert args.lr_warmup_fraction == 0.01 and args.override_opt_param_scheduler
    assert args.recompute_granularity == "full"
    notes = [line for line in capsys.readouterr().out.splitlines() if "old Megatron-LM spellings" in line]
    assert len(notes) == 1
    for renamed in ("--batch-size 4 -> --micro-batch-size 4", "--model-parallel-size 2 -> --tensor-model-parallel-size 2",
                    "--warmup 0.01 -> --lr-warmup-fraction 0.01", "--override-lr-scheduler -> --override-opt-param-scheduler",
                    "--activations-checkpoint-method uniform -> --recompute-granularity full"):  # fmt: skip
        assert renamed in notes[0]
    assert parse_args(BASE + ["--checkpoint-activations"]).recompute_granularity == "full"


def test_old_spelling_that_contradicts_the_current_flag_is_refused(capsys):
    assert "--batch-size 4 (old spelling of --micro-batch-size) contradicts --micro-batch-size 2" in _error(
        capsys, BASE + ["--batch-size", "4"]
    )
    assert "block recomputes only some layers" in _error(
        capsys, BASE + ["--activations-checkpoint-method", "block"]
    )


@pytest.mark.parametrize("flag", sorted(UNSUPPORTED))
def test_unsupported_megatron_flags_are_refused_with_the_reason(capsys, flag):
    assert f"{flag}: " in _error(capsys, BASE + [flag])


def test_only_mmap_datasets(capsys):
    assert "invalid choice: 'lazy'" in _error(capsys, BASE + ["--data-impl", "lazy"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_nccl_without_gpu_is_named(capsys):
    message = _error(capsys, BASE + ["--distributed-backend", "nccl"], world_size=2)
    assert "--distributed-backend nccl needs CUDA GPUs" in message


def test_pipeline_flags_derive_the_virtual_size():
    from megatron.parallel.pipeline_layout import virtual_pipeline_size

    flags = ["--num-layers", "8", "--pipeline-model-parallel-size", "2", "--global-batch-size", "4"]
    args = parse_args(BASE + flags + ["--num-layers-per-virtual-pipeline-stage", "2"], world_size=2)
    assert args.virtual_pipeline_model_parallel_size == 2 and virtual_pipeline_size(args) == 2
    args = parse_args(BASE + flags + ["--virtual-pipeline-model-parallel-size", "4"], world_size=2)
    assert args.virtual_pipeline_model_parallel_size == 4 and virtual_pipeline_size(args) == 4
    args = parse_args(BASE + flags, world_size=2)
    assert args.virtual_pipeline_model_parallel_size is None and virtual_pipeline_size(args) == 1


def test_pipeline_with_the_distributed_optimizer_and_sequence_parallelism_is_accepted():
    flags = ["--pipeline-model-parallel-size", "2", "--use-distributed-optimizer", "--global-batch-size", "8"]
    args = parse_args(BASE + flags, world_size=4)
    assert args.use_distributed_optimizer and args.data_parallel_size == 2
    args = parse_args(
        BASE + flags + ["--tensor-model-parallel-size", "2", "--sequence-parallel"], world_size=8
    )
    assert args.sequence_parallel and args.use_distributed_optimizer and args.data_parallel_size == 2
