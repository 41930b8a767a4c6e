"""Text generation with a KV cache (Megatron-LM's megatron/text_generation): sampling, the generation loop,
text-level post-processing, checkpoint loading for inference, and the REST server.

    sampling.py     SamplingParams, greedy / temperature / top-k / top-p token choice
    generation.py   generate(): prefill + one token per step with the KV cache, identical on all TP ranks
    api.py          generate_and_post_process(): prompts (text) -> text, segments, logprobs
    loading.py      inference_args() + load_model_for_inference(): the model of a checkpoint
    server.py       PUT /api on http.server (Megatron-LM's request and response format)
"""

from megatron.model.transformer import InferenceParams
from megatron.text_generation.api import (
    GenerationResponse,
    end_of_document_id,
    generate_and_post_process,
    tokenize_prompts,
)
from megatron.text_generation.generation import GenerationError, GenerationOutput, generate
from megatron.text_generation.loading import add_inference_args, inference_args, load_model_for_inference
from megatron.text_generation.sampling import GREEDY, SamplingParams, sample, top_k_filter, top_p_filter

__all__ = [
    "GREEDY",
    "GenerationError",
    "GenerationOutput",
    "GenerationResponse",
    "InferenceParams",
    "SamplingParams",
    "add_inference_args",
    "end_of_document_id",
    "generate",
    "generate_and_post_process",
    "inference_args",
    "load_model_for_inference",
    "sample",
    "tokenize_prompts",
    "top_k_filter",
    "top_p_filter",
]
