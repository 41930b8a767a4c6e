"""Tensor- and data-parallel building blocks (Megatron-LM's "mpu"): process groups, the conjugate
communication functions, parallel layers, vocab-parallel cross entropy, and RNG handling for dropout."""

from megatron.parallel.cross_entropy import vocab_parallel_cross_entropy, vocab_range_from_global_vocab_size
from megatron.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    param_is_not_tensor_parallel_duplicate,
    set_tensor_model_parallel_attributes,
)
from megatron.parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from megatron.parallel.random import checkpoint, get_rng_tracker, model_parallel_seed
from megatron.parallel.state import ParallelState, initialize_model_parallel, single_process_state

__all__ = [
    "ColumnParallelLinear",
    "ParallelState",
    "checkpoint",
    "get_rng_tracker",
    "model_parallel_seed",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "copy_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region",
    "initialize_model_parallel",
    "param_is_not_tensor_parallel_duplicate",
    "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "set_tensor_model_parallel_attributes",
    "single_process_state",
    "vocab_parallel_cross_entropy",
    "vocab_range_from_global_vocab_size",
]
