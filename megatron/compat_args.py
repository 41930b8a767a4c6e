"""Megatron-LM flags that existing launch scripts pass but that choose an implementation, not a result.

They are accepted so that such scripts run unchanged: this project always does what the flag asks for
(or has no such knob), and `report_compat_flags` names the ones given. Flags that would change the model
or the parallel layout in ways this project does not implement are refused with the reason.
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
    "--log-num-zeros-in-grad": "not logged",
    "--log-params-norm": "not logged",
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
}
# flag -> what is missing, for flags whose result this project cannot produce.
UNSUPPORTED = {
    "--swiglu": "the MLP is GeLU only",
    "--untie-embeddings-and-output-weights": "the output layer is always tied to the word embeddings",
    "--use-rotary-position-embeddings": "positions are learned absolute or ALiBi",
    "--group-query-attention": "attention is multi-head (every head has its own keys and values)",
}


def add_compat_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Megatron-LM compatibility (accepted; see megatron/compat_args.py)")
    for flag, why in NO_EFFECT.items():
        g.add_argument(flag, action="store_true", dest=_dest(flag), help=f"No effect: {why}.")
    for flag, (choices, why) in NO_EFFECT_VALUE.items():
        g.add_argument(
            flag, default=None, choices=choices, metavar="VALUE" if choices is None else None,
            dest=_dest(flag), help=f"No effect: {why}.",
        )  # fmt: skip
    g.add_argument(
        "--checkpoint-activations",
        action="store_true",
        help="Older Megatron's name for --recompute-granularity full.",
    )
    for flag, why in UNSUPPORTED.items():
        g.add_argument(flag, action="store_true", dest=_dest(flag), help=f"Refused: {why}.")


def _dest(flag: str) -> str:
    return "compat_" + flag.lstrip("-").replace("-", "_").lower()


def check_compat_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """Refuse unsupported flags (parser.error); map old aliases; return notes on flags with no effect."""
    for flag, why in UNSUPPORTED.items():
        if getattr(args, _dest(flag)):
            parser.error(f"{flag}: {why}")
    if args.checkpoint_activations:
        args.recompute_granularity = "full"
    notes = [f"{flag} ({why})" for flag, why in NO_EFFECT.items() if getattr(args, _dest(flag))]
    notes += [f"{flag} ({why})" for flag, (_, why) in NO_EFFECT_VALUE.items() if getattr(args, _dest(flag))]
    return notes
