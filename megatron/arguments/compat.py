"""Megatron-LM flags that existing launch scripts pass but that choose an implementation, not a result,
and the old spellings of flags that Megatron-LM's own example scripts used before its parser renamed them.

They are accepted so that such scripts run unchanged: this project always does what the flag asks for
(or has no such knob), and `check_compat_args` returns a note naming the ones given. An old spelling is
taken as its current flag (`RENAMED`), with a note. Flags that would change the model or the parallel
layout in ways this project does not implement are refused with the reason.
"""

from __future__ import annotations

import argparse

# flag -> why it needs no action here (store_true flags).
NO_EFFECT = {
    "--no-masked-softmax-fusion": "attention is torch's scaled_dot_product_attention",
    "--no-bias-dropout-fusion": "bias, dropout and residual are plain torch ops",
    "--use-flash-attn": "scaled_dot_product_attention picks flash attention where the device has it",
    "--attention-softmax-in-fp32": "the attention softmax is computed by scaled_dot_product_attention",
    "--apply-query-key-layer-scaling": "a fp16 overflow guard that leaves the result unchanged",
    "--no-query-key-layer-scaling": "a fp16 overflow guard that leaves the result unchanged",
    "--accumulate-allreduce-grads-in-fp32": "gradients are always accumulated and all-reduced in fp32",
    "--no-gradient-accumulation-fusion": "there is no fused weight-gradient kernel",
    "--no-async-tensor-model-parallel-allreduce": "tensor-parallel all-reduces are synchronous",
    "--use-cpu-initialization": "weights are always drawn whole and sliced, independent of the TP size",
    "--distribute-checkpointed-activations": "recomputed layers keep their inputs whole on every TP rank",
    "--no-contiguous-buffers-in-local-ddp": "gradients always live in contiguous buckets",
    "--log-validation-ppl-to-tensorboard": "validation perplexity is always written with --tensorboard-dir",
    "--log-batch-size-to-tensorboard": "the batch size is always written with --tensorboard-dir",
}
# flag -> (allowed values or None for any, why) for flags taking one value.
NO_EFFECT_VALUE = {
    "--data-impl": (("mmap", "infer"), "datasets are always Megatron's mmap .bin/.idx"),
    "--DDP-impl": (("local", "torch"), "data parallelism is this project's bucketed DDP"),
    "--tensorboard-queue-size": (None, "TensorBoard's queue is sized automatically"),
    "--timing-log-level": (None, "per-iteration time is always logged"),
    "--empty-unused-memory-level": (None, "the caching allocator is left alone"),
    "--activations-checkpoint-num-layers": (
        None,
        "each recomputed layer is its own chunk; the result is the same",
    ),
    "--checkpoint-num-layers": (None, "each recomputed layer is its own chunk; the result is the same"),
}
# Old spelling -> (current flag, its dest, type) for flags taking one value; Megatron-LM renamed them and
# its old example scripts (pretrain_gpt2.sh: --batch-size 8 --warmup .01 --model-parallel-size 2) use them.
RENAMED = {
    "--batch-size": ("--micro-batch-size", "micro_batch_size", int),
    "--model-parallel-size": ("--tensor-model-parallel-size", "tensor_model_parallel_size", int),
    "--warmup": ("--lr-warmup-fraction", "lr_warmup_fraction", float),
}
# Old store_true spelling -> (current flag, its dest).
RENAMED_SWITCHES = {
    "--override-lr-scheduler": ("--override-opt-param-scheduler", "override_opt_param_scheduler"),
    "--use-checkpoint-lr-scheduler": (
        "--use-checkpoint-opt-param-scheduler",
        "use_checkpoint_opt_param_scheduler",
    ),
}
# flag -> what is missing, for flags whose result this project cannot produce.
UNSUPPORTED = {}


def add_compat_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Megatron-LM compatibility (accepted; see megatron/arguments/compat.py)")
    for flag, why in NO_EFFECT.items():
        g.add_argument(flag, action="store_true", dest=_dest(flag), help=f"No effect: {why}.")
    for flag, (choices, why) in NO_EFFECT_VALUE.items():
        g.add_argument(
            flag, default=None, choices=choices, metavar="VALUE" if choices is None else None,
            dest=_dest(flag), help=f"No effect: {why}.",
        )  # fmt: skip
    for flag, (new, _, kind) in RENAMED.items():
        g.add_argument(flag, type=kind, default=None, dest=_dest(flag), help=f"Old spelling of {new}.")
    for flag, (new, _) in RENAMED_SWITCHES.items():
        g.add_argument(flag, action="store_true", dest=_dest(flag), help=f"Old spelling of {new}.")
    g.add_argument(
        "--checkpoint-activations",
        action="store_true",
        help="Old spelling of --recompute-granularity full (every layer recomputed).",
    )
    g.add_argument(
        "--activations-checkpoint-method",
        choices=["uniform", "block"],
        default=None,
        help="Old spelling: uniform is --recompute-granularity full; block (some layers only) is refused.",
    )
    for flag, why in UNSUPPORTED.items():
        g.add_argument(flag, action="store_true", dest=_dest(flag), help=f"Refused: {why}.")


def _dest(flag: str) -> str:
    return "compat_" + flag.lstrip("-").replace("-", "_").lower()


def check_compat_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[str], list[str]]:
    """Refuse unsupported flags (parser.error); take old spellings as their current flags.

    Returns (notes on flags with no effect, notes on old spellings taken as current flags).
    """
    for flag, why in UNSUPPORTED.items():
        if getattr(args, _dest(flag)):
            parser.error(f"{flag}: {why}")
    notes = [f"{flag} ({why})" for flag, why in NO_EFFECT.items() if getattr(args, _dest(flag))]
    notes += [f"{flag} ({why})" for flag, (_, why) in NO_EFFECT_VALUE.items() if getattr(args, _dest(flag))]
    return notes, _rename_old_spellings(parser, args)


def _rename_old_spellings(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    renamed = []
    for flag, (new, dest, _) in RENAMED.items():
        value = getattr(args, _dest(flag))
        if value is None:
            continue
        current = getattr(args, dest)
        if current not in (None, parser.get_default(dest), value):
            parser.error(f"{flag} {value} (old spelling of {new}) contradicts {new} {current}")
        setattr(args, dest, value)
        renamed.append(f"{flag} {value} -> {new} {value}")
    for flag, (new, dest) in RENAMED_SWITCHES.items():
        if getattr(args, _dest(flag)):
            setattr(args, dest, True)
            renamed.append(f"{flag} -> {new}")
    if args.activations_checkpoint_method == "block":
        parser.error(
            "--activations-checkpoint-method block recomputes only some layers; this project recomputes "
            "every layer (--activations-checkpoint-method uniform, i.e. --recompute-granularity full)"
        )
    for flag, given in (("--checkpoint-activations", args.checkpoint_activations),
                        ("--activations-checkpoint-method uniform", args.activations_checkpoint_method)):  # fmt: skip
        if given:
            args.recompute_granularity = "full"
            renamed.append(f"{flag} -> --recompute-granularity full")
    return renamed
