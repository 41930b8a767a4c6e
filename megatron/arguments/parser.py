"""The parser: every flag group in Megatron's --help order, parsing, and validation subsystem by subsystem.

`parse_args(argv)` returns an `argparse.Namespace` whose attribute names are Megatron's (it is saved as
`args` in every checkpoint, where converters written for Megatron read it). Every inconsistency between
flags is reported by `parser.error`, which prints one line naming the flags and a pointer to --help, and
exits with status 2: no traceback for a user mistake.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Callable, NoReturn, Optional

from megatron.arguments.compat import add_compat_args, check_compat_args
from megatron.arguments.data import add_data_args, check_data_args
from megatron.arguments.distributed import (
    add_distributed_args,
    check_distributed_args,
    check_pipeline_args,
    launcher_ranks,
    world_size_from_env,
)
from megatron.arguments.llama import add_llama_args
from megatron.arguments.model import (
    CHECKPOINT_MODEL_ARGS,
    add_initialization_args,
    add_network_args,
    add_regularization_args,
    check_model_args,
)
from megatron.arguments.training import (
    add_checkpointing_args,
    add_learning_rate_args,
    add_logging_args,
    add_mixed_precision_args,
    add_training_args,
    add_validation_args,
    check_checkpointing_args,
    check_learning_rate_args,
    check_mixed_precision_args,
    check_training_args,
)

ExtraArgsProvider = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line and a pointer to --help (not the 100-line usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(see {self.prog} --help)\n")


def build_parser(extra_args_provider: Optional[ExtraArgsProvider] = None) -> argparse.ArgumentParser:
    """All of Megatron's flags that this project implements, grouped as in Megatron's --help."""
    parser = ArgumentParser(description="Megatron-style GPT/BERT pretraining arguments", allow_abbrev=False)
    add_network_args(parser)
    add_llama_args(parser)
    add_regularization_args(parser)
    add_training_args(parser)
    add_initialization_args(parser)
    add_learning_rate_args(parser)
    add_checkpointing_args(parser)
    add_mixed_precision_args(parser)
    add_distributed_args(parser)
    add_validation_args(parser)
    add_data_args(parser)
    add_logging_args(parser)
    add_compat_args(parser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    return parser


def parse_args(
    argv: Optional[Sequence[str]] = None,
    extra_args_provider: Optional[ExtraArgsProvider] = None,
    defaults: Optional[dict] = None,
    world_size: Optional[int] = None,
    require_data: bool = True,
) -> argparse.Namespace:
    """Parse and validate. `defaults` override flag defaults (as Megatron's args_defaults)."""
    parser = build_parser(extra_args_provider)
    if defaults:
        parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    if args.use_checkpoint_args:
        _apply_checkpoint_args(parser, args)
    args.rank = launcher_ranks()[0]
    args.world_size = world_size if world_size is not None else world_size_from_env()
    notes, renamed = check_compat_args(parser, args)
    validate_args(parser, args, require_data=require_data)
    if notes and args.rank == 0:
        print("note: accepted for Megatron-LM compatibility, no effect here: " + "; ".join(notes), flush=True)
    if renamed and args.rank == 0:
        print("note: old Megatron-LM spellings taken as the current flags: " + "; ".join(renamed), flush=True)
    return args


def model_flag_differences(saved: argparse.Namespace, current: argparse.Namespace) -> list[str]:
    """For each model attribute of CHECKPOINT_MODEL_ARGS (file paths aside) that both Namespaces hold and
    that differs: "checkpoint has --hidden-size 64, this run asks for 128", spelled with the flags."""
    actions = {action.dest: action for action in build_parser()._actions if action.option_strings}
    differences = []
    for name in CHECKPOINT_MODEL_ARGS:
        if name in ("vocab_file", "merge_file", "tokenizer_model") or not hasattr(saved, name):
            continue
        old, new = getattr(saved, name), getattr(current, name, None)
        if old == new:
            continue
        action = actions.get(name)
        if action is None:  # derived values: padded_vocab_size, num_tokentypes
            label = name.replace("_", " ")
            differences.append(f"checkpoint has {label} {old}, this run has {new}")
        elif action.nargs == 0:  # a switch: given or not
            flag = action.option_strings[0]
            differences.append(
                f"checkpoint was saved with {flag}, this run is not"
                if old == action.const
                else f"checkpoint was saved without {flag}, this run asks for it"
            )
        else:
            flag = action.option_strings[0]
            differences.append(f"checkpoint has {flag} {old}, this run asks for {new}")
    return differences


def _apply_checkpoint_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from megatron.checkpointing import CheckpointError, load_args_from_checkpoint

    if not args.load:
        parser.error("--use-checkpoint-args needs --load DIR")
    try:
        ckpt_args = load_args_from_checkpoint(args.load)
    except CheckpointError as e:
        parser.error(f"--use-checkpoint-args: {e}")
    for name in CHECKPOINT_MODEL_ARGS:
        if hasattr(ckpt_args, name):
            setattr(args, name, getattr(ckpt_args, name))
    if args.seq_length is None:
        args.seq_length = getattr(ckpt_args, "seq_length", None)


def validate_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, require_data: bool = True
) -> None:
    """Check every cross-flag constraint, subsystem by subsystem (each check sits after its flags);
    fill derived values (data-parallel size, defaults)."""
    fail = parser.error
    check_distributed_args(args, fail)
    check_model_args(args, fail)
    check_training_args(args, fail)
    check_pipeline_args(args, fail)
    check_learning_rate_args(args, fail)
    check_mixed_precision_args(args, fail)
    check_data_args(args, fail, require_data)
    check_checkpointing_args(args, fail)
