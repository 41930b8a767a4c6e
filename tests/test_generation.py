"""Text generation: top-k/top-p filtering and sampling, the KV cache against full forward passes, the
generation loop (greedy, sampling, end-of-document stop, ragged batches, log probabilities, errors), and
tensor parallelism (TP = 2 and 4 generate what one process does)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.model import GPTModel, TransformerConfig
from megatron.model.transformer import InferenceParams
from megatron.parallel.state import initialize_model_parallel, single_process_state
from megatron.text_generation import (
    GREEDY,
    GenerationError,
    SamplingParams,
    generate,
    sample,
    top_k_filter,
    top_p_filter,
)
from tests.distributed_utils import run_distributed
from tests.randomize import randomize_parameters_

VOCAB = 50  # real vocabulary; the model's is padded to 64
PADDED_VOCAB = 64


def _config(position_embedding_type: str = "learned_absolute") -> TransformerConfig:
    # A large init std makes the logits peaked, so argmax decisions are far from ties.
    return TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        padded_vocab_size=PADDED_VOCAB,
        max_position_embeddings=48,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.3,
        position_embedding_type=position_embedding_type,
    )


def _model(position_embedding_type: str = "learned_absolute", parallel=None, seed: int = 0) -> GPTModel:
    parallel = parallel if parallel is not None else single_process_state()
    model = GPTModel(_config(position_embedding_type), parallel, parallel_output=False).eval()
    randomize_parameters_(model, seed, parallel, std=0.3)  # biases and norms too, the same at any TP size
    return model


def _positions(start: int, end: int, batch: int) -> torch.Tensor:
    return torch.arange(start, end).expand(batch, end - start)


def _greedy_without_cache(model: GPTModel, prompt: list[int], new_tokens: int) -> list[int]:
    """Reference: a full forward pass over the whole sequence for every new token, argmax of the last logits."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            x = torch.tensor([tokens])
            logits = model(x, _positions(0, len(tokens), 1))[0, -1, :VOCAB]
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt) :]


# --- filtering and sampling ----------------------------------------------------------------------------


def test_top_k_filter_keeps_the_k_largest_per_row():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, -1.0, 7.0, 7.0, 1.0]])
    filtered = top_k_filter(logits, 2)
    assert torch.equal(
        torch.isfinite(filtered), torch.tensor([[0, 1, 0, 1, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    )
    kept = torch.isfinite(filtered)
    assert torch.equal(filtered[kept], logits[kept])  # kept entries unchanged
    assert torch.equal(torch.isfinite(top_k_filter(logits, 5)), torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="top_k"):
        top_k_filter(logits, 6)


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.4, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (0.99, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])],
)
def test_top_p_filter_keeps_the_smallest_nucleus(top_p, kept):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    permutation = torch.tensor([2, 0, 3, 1])  # unsorted input: token i has probability probs[permutation[i]]
    logits = probs[permutation].log().unsqueeze(0)
    filtered = top_p_filter(logits, top_p)[0]
    expected = torch.zeros(4, dtype=torch.bool)
    for rank in kept:  # rank = position in descending order of probability
        expected[(permutation == rank).nonzero()] = True
    assert torch.equal(torch.isfinite(filtered), expected)
    assert torch.equal(filtered[expected], logits[0][expected])


def test_sampling_params_reject_invalid_combinations():
    for kwargs in [dict(temperature=0.0), dict(top_k=-1), dict(top_p=1.5), dict(top_k=5, top_p=0.9)]:
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)
    assert GREEDY.greedy and not SamplingParams(top_k=2).greedy


def test_sample_greedy_and_seeded_sampling():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, GREEDY), logits.argmax(-1))
    assert torch.equal(sample(logits, SamplingParams(top_k=1, temperature=5.0)), logits.argmax(-1))
    params = SamplingParams(temperature=2.0)
    draws = [sample(logits, params, torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1])
    many = torch.stack([sample(logits, params, torch.Generator().manual_seed(s)) for s in range(20)])
    assert len({tuple(row.tolist()) for row in many}) > 1  # different seeds, different samples


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(20000, 1)
    generator = torch.Generator().manual_seed(0)
    cases = [
        (SamplingParams(), logits[0]),
        (SamplingParams(temperature=0.5), logits[0] / 0.5),
        (SamplingParams(top_k=2), torch.tensor([2.0, 1.0, -math.inf, -math.inf])),
        (
            SamplingParams(top_p=0.8),
            torch.tensor([2.0, 1.0, -math.inf, -math.inf]),
        ),  # p0 = 0.64, p0+p1 = 0.88
    ]
    for params, expected_logits in cases:
        counts = torch.bincount(sample(logits, params, generator), minlength=4).float() / logits.size(0)
        expected = torch.softmax(expected_logits, dim=-1)
        assert torch.allclose(counts, expected, atol=0.015), (params, counts, expected)


# --- the KV cache ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("position_embedding_type", ["learned_absolute", "alibi"])
def test_kv_cache_logits_equal_full_forward_at_every_step(position_embedding_type):
    model = _model(position_embedding_type)
    tokens = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens, _positions(0, 20, 3))
        cache = InferenceParams(max_batch_size=3, max_sequence_length=20)
        chunks = [(0, 6), (6, 9)] + [(t, t + 1) for t in range(9, 20)]  # prefill, a chunk, then single tokens
        for start, end in chunks:
            logits = model(tokens[:, start:end], _positions(start, end, 3), inference_params=cache)
            assert cache.sequence_len_offset == end
            torch.testing.assert_close(logits, full[:, start:end], atol=1e-5, rtol=0)
    assert len(cache.key_value_memory_dict) == 2  # one entry per layer


def test_kv_cache_overflow_is_an_error():
    model = _model()
    cache = InferenceParams(max_batch_size=1, max_sequence_length=4)
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), _positions(0, 3, 1), inference_params=cache)
        with pytest.raises(ValueError, match="do not fit"):
            model(torch.zeros(1, 2, dtype=torch.long), _positions(3, 5, 1), inference_params=cache)


# --- generation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("position_embedding_type", ["learned_absolute", "alibi"])
def test_greedy_generation_with_cache_equals_argmax_without_cache(position_embedding_type):
    model = _model(position_embedding_type)
    prompt = [3, 17, 5, 42, 8]
    out = generate(model, [prompt], 12, single_process_state(), GREEDY, vocab_size=VOCAB)
    expected = _greedy_without_cache(model, prompt, 12)
    assert out.generated()[0] == expected
    assert len(set(expected)) >= 3  # not one token repeated
    assert out.rows()[0] == prompt + expected and int(out.lengths[0]) == 17


def test_ragged_batch_equals_each_prompt_alone():
    model = _model()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [20, 21, 22]]
    out = generate(model, prompts, 6, single_process_state(), GREEDY, vocab_size=VOCAB)
    for row, prompt in enumerate(prompts):
        alone = generate(model, [prompt], 6, single_process_state(), GREEDY, vocab_size=VOCAB)
        assert out.generated()[row] == alone.generated()[0] == _greedy_without_cache(model, prompt, 6)
    assert out.lengths.tolist() == [13, 7, 9] and out.prompt_lengths.tolist() == [7, 1, 3]
    assert out.tokens.shape == (3, 13)


def test_top_k_1_equals_greedy_and_sampling_is_seeded():
    model = _model()
    prompts = [[4, 8, 15], [16, 23, 42 % VOCAB, 7]]

    def run(params, seed):
        return generate(
            model, prompts, 10, single_process_state(), params, vocab_size=VOCAB, seed=seed
        ).generated()

    greedy = run(GREEDY, None)
    assert run(SamplingParams(top_k=1, temperature=3.0), 5) == greedy
    hot = SamplingParams(temperature=3.0)
    assert run(hot, 11) == run(hot, 11)
    assert run(hot, 11) != run(hot, 12)
    assert run(hot, 11) != greedy
    for tokens in run(SamplingParams(temperature=3.0, top_k=40), 3) + run(hot, 4):
        assert all(0 <= t < VOCAB for t in tokens)  # padded vocabulary entries are never chosen


def test_generation_stops_at_end_of_document():
    model = _model()
    prompt = [3, 17, 5]
    free = generate(model, [prompt], 10, single_process_state(), GREEDY, vocab_size=VOCAB).generated()[0]
    eod = free[3]
    stop = free.index(eod)  # first occurrence
    out = generate(model, [prompt, [7, 7]], 10, single_process_state(), GREEDY, vocab_size=VOCAB, eod=eod)
    assert out.generated()[0] == free[: stop + 1]  # the end-of-document token is kept
    assert int(out.lengths[0]) == len(prompt) + stop + 1
    row1 = out.tokens[1, int(out.lengths[1]) :]
    assert torch.all(row1 == eod)  # padding after a row's end is the end-of-document id
    no_stop = generate(
        model, [prompt], 10, single_process_state(), GREEDY, vocab_size=VOCAB, eod=eod, stop_on_eod=False
    )
    assert no_stop.generated()[0] == free


def test_log_probs_match_a_full_forward_pass():
    model = _model()
    prompts = [[5, 6, 7, 8], [9, 10]]
    out = generate(
        model, prompts, 5, single_process_state(), SamplingParams(temperature=2.0), vocab_size=VOCAB, seed=0,
        return_log_probs=True,
    )  # fmt: skip
    with torch.no_grad():
        logits = model(out.tokens, _positions(0, out.tokens.size(1), 2))[..., :VOCAB]
    reference = torch.gather(F.log_softmax(logits[:, :-1], -1), -1, out.tokens[:, 1:, None]).squeeze(-1)
    for row, length in enumerate(out.lengths.tolist()):
        torch.testing.assert_close(
            out.log_probs[row, : length - 1], reference[row, : length - 1], atol=1e-5, rtol=0
        )
    scored = generate(model, prompts, 0, single_process_state(), vocab_size=VOCAB, return_log_probs=True)
    assert scored.lengths.tolist() == [4, 2]
    torch.testing.assert_close(scored.log_probs[0], reference[0, :3], atol=1e-5, rtol=0)


def test_generation_errors():
    model = _model()
    state = single_process_state()
    with pytest.raises(GenerationError, match="max_position_embeddings"):
        generate(model, [[1] * 40], 9, state, GREEDY, vocab_size=VOCAB)  # 40 + 9 > 48
    generate(model, [[1] * 40], 8, state, GREEDY, vocab_size=VOCAB)  # exactly 48 fits
    with pytest.raises(GenerationError, match="empty"):
        generate(model, [[1, 2], []], 4, state, GREEDY, vocab_size=VOCAB)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(model, [[1, VOCAB]], 4, state, GREEDY, vocab_size=VOCAB)
    with pytest.raises(GenerationError, match="no prompts"):
        generate(model, [], 4, state, GREEDY, vocab_size=VOCAB)
    parallel_logits = GPTModel(_config(), state, parallel_output=True).eval()
    with pytest.raises(ValueError, match="parallel_output=False"):
        generate(parallel_logits, [[1]], 4, state, GREEDY, vocab_size=VOCAB)


# --- tensor parallelism ---------------------------------------------------------------------------------


def _generate_all(parallel) -> dict:
    """Greedy (learned and ALiBi) and seeded top-k sampling, with log probabilities."""
    prompts = [[3, 17, 5, 42, 8], [11, 2]]
    results = {}
    for kind in ("learned_absolute", "alibi"):
        model = _model(kind, parallel)
        out = generate(model, prompts, 8, parallel, GREEDY, vocab_size=VOCAB, return_log_probs=True)
        results[kind] = (out.rows(), out.log_probs)
    sampled = generate(
        _model("learned_absolute", parallel), prompts, 8, parallel, SamplingParams(top_k=5), vocab_size=VOCAB,
        seed=123,
    )  # fmt: skip
    results["sampled"] = (sampled.rows(), None)
    return results


def _generate_on_rank(rank: int, world_size: int, tp: int) -> dict:
    torch.set_num_threads(1)
    return _generate_all(initialize_model_parallel(tp))


@pytest.mark.parametrize("world_size, tp", [(2, 2), (4, 4)])
def test_tensor_parallel_generation_equals_single_process(world_size, tp):
    reference = _generate_all(single_process_state())
    for rank, result in enumerate(run_distributed(_generate_on_rank, world_size, args=(tp,))):
        for key, (rows, log_probs) in reference.items():
            assert result[key][0] == rows, (rank, key)
            if log_probs is not None:
                torch.testing.assert_close(result[key][1], log_probs, atol=1e-5, rtol=0)
