"""Pipeline schedules against one process: the gradients of every parameter (every one randomised) and the
losses of one global batch equal those of the whole model run without pipelining, for 1F1B, interleaved
1F1B, uneven stages, TP x PP and PP x DP, GPT and BERT, also with transfers paired by posting order alone
(as NCCL pairs them); 1F1B holds at most p microbatches of activations on a stage (counted), and a sent
output's memory is freed before its backward."""

from __future__ import annotations

import itertools
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn

from megatron.distributed import DistributedDataParallel
from megatron.model import BertModel, GPTModel
from megatron.model.config import TransformerConfig
from megatron.model.utils import tensor_parallel_dim
from megatron.parallel import p2p
from megatron.parallel.pipeline_layout import StageLayout, global_key, stage_layouts
from megatron.parallel.state import initialize_model_parallel, single_process_state
from megatron.schedules import (
    ScheduleConfig,
    forward_backward_no_pipelining,
    get_forward_backward_func,
    replay_iterators,
)
from tests.distributed_utils import run_distributed

VOCAB, SEQ, HIDDEN, MICRO = 64, 8, 16, 2


def _config(num_layers: int, bert: bool) -> TransformerConfig:
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=HIDDEN,
        num_attention_heads=2,
        padded_vocab_size=VOCAB,
        max_position_embeddings=SEQ,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        num_tokentypes=2 if bert else 0,
    )


def _build(config: TransformerConfig, parallel, stage, bert: bool) -> nn.Module:
    torch.manual_seed(3)
    cls = BertModel if bert else GPTModel
    return cls(config, parallel, stage=stage)


def _randomised_whole(config: TransformerConfig, bert: bool) -> dict[str, torch.Tensor]:
    """The whole model's state dict with every parameter perturbed (layernorms, biases included)."""
    model = _build(config, single_process_state(), None, bert)
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=gen))
    return model.state_dict()


def _load_stage(model: nn.Module, whole: dict, stage: StageLayout, tp_rank: int, tp_size: int) -> None:
    """Give a stage's parameters the whole model's values (its layers, its TP slice)."""
    state = {}
    for key in model.state_dict():
        full = whole[global_key(key, stage)]
        dim = tensor_parallel_dim(global_key(key, stage))
        state[key] = full if dim is None else torch.chunk(full, tp_size, dim=dim)[tp_rank]
    model.load_state_dict(state)


def _batches(num_microbatches: int, samples: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(0, VOCAB, (samples, SEQ + 1), generator=gen) for _ in range(num_microbatches)]


def _forward_step(bert: bool):
    def step(data_iterator, model):
        data = next(data_iterator)
        tokens, labels = data[:, :-1], data[:, 1:]
        if bert:
            types = (torch.arange(SEQ) >= SEQ // 2).long().expand_as(tokens)
            padding = torch.ones_like(tokens)
            output = model(tokens, padding, types, lm_labels=labels)
        else:
            output = model(tokens, torch.arange(SEQ).expand_as(tokens), labels=labels)

        def loss_func(output):
            per_token = output[0] if bert else output
            loss = per_token.float().mean()
            if bert:
                loss = loss + output[1].float().pow(2).mean()  # the binary head gets a gradient too
            return loss, {"loss": loss.detach()}

        return output, loss_func

    return step


def _reference(config, whole, num_microbatches, dp, bert):
    model = _build(config, single_process_state(), None, bert)
    model.load_state_dict(whole)
    ddp = DistributedDataParallel(model, single_process_state())
    stats = forward_backward_no_pipelining(
        _forward_step(bert),
        iter(_batches(num_microbatches, MICRO * dp)),
        [model],
        ScheduleConfig(num_microbatches, no_sync=ddp.no_sync),
        single_process_state(),
    )
    grads = {name: p.main_grad.clone() for name, p in model.named_parameters()}
    return grads, [float(s["loss"]) for s in stats]


def _pipelined(case: dict, whole: dict, parallel) -> tuple:
    """Run one global batch through this rank's chunks; return (grads by whole-model key, losses)."""
    config, bert, m = _config(case["layers"], case["bert"]), case["bert"], case["m"]
    layouts = stage_layouts(
        case["layers"], parallel.pp_size, case.get("vp", 1), case.get("first"), case.get("last")
    )
    chunks = []
    for stage in layouts[parallel.pp_rank]:
        chunk = _build(config, parallel, stage, bert)
        _load_stage(chunk, whole, stage, parallel.tp_rank, parallel.tp_size)
        chunks.append(chunk)
    ddp = DistributedDataParallel(nn.ModuleList(chunks), parallel)
    mine = [
        b[parallel.dp_rank * MICRO : (parallel.dp_rank + 1) * MICRO]
        for b in _batches(m, MICRO * parallel.dp_size)
    ]
    config_s = ScheduleConfig(m, (MICRO, SEQ, HIDDEN), no_sync=ddp.no_sync)
    schedule = get_forward_backward_func(parallel, len(chunks))
    stats = schedule(_forward_step(bert), iter(mine), chunks, config_s, parallel)
    ddp.finish_grad_sync()  # includes the tied embedding's all-reduce
    grads = {}
    for chunk, stage in zip(chunks, layouts[parallel.pp_rank]):
        for name, param in chunk.named_parameters():
            grads[(global_key(name, stage), name == "word_embeddings_for_head.weight")] = param.main_grad
    losses = []
    if stats and parallel.dp_size > 1:  # the reference averages over the whole global batch
        values = torch.tensor([float(s["loss"]) for s in stats])
        dist.all_reduce(values, group=parallel.dp_group)
        losses = (values / parallel.dp_size).tolist()
    elif stats:
        losses = [float(s["loss"]) for s in stats]
    return grads, losses


def _check_cases(rank: int, world_size: int, cases: list[dict]) -> None:
    for case in cases:
        parallel = initialize_model_parallel(case.get("tp", 1), case["pp"])
        config = _config(case["layers"], case["bert"])
        whole = _randomised_whole(config, case["bert"])
        expected_grads, expected_losses = _reference(config, whole, case["m"], parallel.dp_size, case["bert"])
        grads, losses = _pipelined(case, whole, parallel)
        if parallel.is_pp_last:
            assert losses == pytest.approx(expected_losses, rel=1e-5), case
        else:
            assert losses == [], case
        for (key, _), grad in grads.items():
            full = expected_grads[key]
            dim = tensor_parallel_dim(key)
            if dim is not None:
                full = torch.chunk(full, parallel.tp_size, dim=dim)[parallel.tp_rank]
            torch.testing.assert_close(
                grad, full, rtol=1e-5, atol=1e-6, msg=lambda m, where=f"{case} {key}": f"{where}: {m}"
            )
        held = {key for key, _ in grads}
        gathered = [None] * world_size
        dist.all_gather_object(gathered, held)
        assert set().union(*gathered) == set(expected_grads), case  # every parameter is held somewhere


CASES_2 = [
    {"pp": 2, "layers": 4, "m": 4, "bert": False},
    {"pp": 2, "layers": 4, "m": 1, "bert": False},  # fewer microbatches than stages
    {"pp": 2, "layers": 5, "m": 3, "bert": False, "first": 1, "last": 4},
    {"pp": 2, "layers": 4, "m": 4, "bert": False, "vp": 2},
    {"pp": 2, "layers": 4, "m": 2, "bert": False, "vp": 2},  # m == p: all warm-up
    {"pp": 2, "layers": 2, "m": 3, "bert": True},
]
CASES_4 = [
    {"pp": 4, "layers": 4, "m": 6, "bert": False},
    {"pp": 2, "tp": 2, "layers": 4, "m": 3, "bert": False},
    {"pp": 2, "layers": 2, "m": 3, "bert": False},  # x DP 2
    {"pp": 4, "layers": 8, "m": 8, "bert": False, "vp": 2},
]


def test_pipeline_gradients_equal_one_process_2_ranks():
    run_distributed(_check_cases, world_size=2, args=(CASES_2,))


def test_pipeline_gradients_equal_one_process_4_ranks():
    run_distributed(_check_cases, world_size=4, args=(CASES_4,))


def _check_cases_matched_by_order(rank: int, world_size: int, cases: list[dict]) -> None:
    """_check_cases with one tag for activations and gradients: transfers then pair up by posting order
    alone, as NCCL pairs them (it ignores tags)."""
    with mock.patch.multiple(p2p, _ACTIVATION_TAG=0, _GRADIENT_TAG=0):
        _check_cases(rank, world_size, cases)


def test_transfers_pair_up_by_posting_order_as_on_nccl():
    # PP 2 interleaved: each pair of ranks exchanges activations and gradients in both directions
    cases = [
        {"pp": 2, "layers": 4, "m": 4, "bert": False, "vp": 2},
        {"pp": 2, "layers": 4, "m": 4, "bert": False},
    ]
    run_distributed(_check_cases_matched_by_order, world_size=2, args=(cases,))


@pytest.mark.slow
def test_pipeline_gradients_equal_one_process_8_ranks():
    run_distributed(
        _check_cases, world_size=8, args=([{"pp": 2, "tp": 2, "layers": 4, "m": 4, "bert": False}],)
    )


def _count_activations(rank: int, world_size: int, m: int) -> tuple[int, list[bool]]:
    """Max number of microbatches whose forward ran and whose backward has not yet begun on this stage,
    and, for each non-last-stage microbatch, whether its output was freed before its backward began."""
    parallel = initialize_model_parallel(1, world_size)
    layouts = stage_layouts(world_size, world_size)
    model = _build(_config(world_size, False), parallel, layouts[parallel.pp_rank][0], False)
    ddp = DistributedDataParallel(model, parallel)
    live, peak, freed = [0], [0], []
    inner = _forward_step(False)

    def counting_step(data_iterator, chunk):
        output, loss_func = inner(data_iterator, chunk)
        live[0] += 1
        peak[0] = max(peak[0], live[0])

        def backward_began(*_):
            live[0] -= 1
            if not parallel.is_pp_last:
                freed.append(output.untyped_storage().nbytes() <= output.element_size())

        output.grad_fn.register_prehook(backward_began)
        return output, loss_func

    config = ScheduleConfig(m, (MICRO, SEQ, HIDDEN), no_sync=ddp.no_sync)
    get_forward_backward_func(parallel)(counting_step, iter(_batches(m, MICRO)), [model], config, parallel)
    assert live[0] == 0
    return peak[0], freed


def test_1f1b_holds_at_most_p_microbatches():
    p, m = 4, 8
    results = run_distributed(_count_activations, world_size=p, args=(m,))
    assert [peak for peak, _ in results] == [p - s for s in range(p)]  # stage s: p - s, never above p
    assert all(all(freed) and len(freed) == m for _, freed in results[:-1])


def test_replay_iterators_give_each_chunk_the_same_sequence():
    source = iter(range(6))
    a, b = replay_iterators(source, 2)
    assert [next(a), next(a), next(b), next(a), next(b), next(b)] == [0, 1, 0, 2, 1, 2]
    assert list(itertools.islice(a, 3)) == [3, 4, 5] and list(b) == [3, 4, 5]
