"""Command-line arguments with Megatron-LM's flag names, validated once into an explicit config.

One module per subsystem, each holding its flags and the check of their cross-flag constraints next to
them: `model` (network shape, regularisation, initialisation, and `transformer_config_from_args`),
`llama` (RoPE, RMSNorm, SwiGLU, GQA, untied and bias-free layers), `training` (batch, schedule,
checkpointing, precision, logging), `distributed` (the TP x PP x DP grid, the launcher), `data` (datasets
and tokenizer), `compat` (Megatron-LM flags accepted for compatibility, old spellings); `parser` puts
them together (`build_parser`, `parse_args`, `validate_args`).
"""

from megatron.arguments.distributed import launcher_ranks, world_size_from_env
from megatron.arguments.model import CHECKPOINT_MODEL_ARGS, transformer_config_from_args
from megatron.arguments.parser import (
    ArgumentParser,
    ExtraArgsProvider,
    build_parser,
    model_flag_differences,
    parse_args,
    validate_args,
)

__all__ = [
    "CHECKPOINT_MODEL_ARGS",
    "ArgumentParser",
    "ExtraArgsProvider",
    "build_parser",
    "launcher_ranks",
    "model_flag_differences",
    "parse_args",
    "transformer_config_from_args",
    "validate_args",
    "world_size_from_env",
]
