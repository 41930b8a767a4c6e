"""MegatronOptimizer: param groups, fp32/bf16/fp16 steps, loss scaling, inf/nan skipping, clipping, state."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from megatron.distributed import DistributedDataParallel
from megatron.optimizer import (
    DynamicGradScaler,
    MegatronOptimizer,
    OptimizerConfig,
    build_optimizer,
    get_param_groups,
)
from megatron.parallel.state import initialize_model_parallel, single_process_state
from tests.distributed_utils import run_distributed

SINGLE = single_process_state()


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def make_model(dtype: torch.dtype = torch.float32) -> SmallNet:
    torch.manual_seed(0)
    return SmallNet().to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(4, 5, generator=gen).to(dtype), torch.randn(4, 3, generator=gen).to(dtype)


def loss_of(model: nn.Module, step: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x, y = batch(step, dtype)
    return ((model(x).float() - y.float()) ** 2).mean()


def wrapped(
    dtype: torch.dtype = torch.float32, **config: object
) -> tuple[DistributedDataParallel, MegatronOptimizer]:
    ddp = DistributedDataParallel(make_model(dtype), SINGLE)
    return ddp, build_optimizer(ddp, OptimizerConfig(**config), SINGLE)


def set_main_grads(ddp: DistributedDataParallel, value: float) -> None:
    ddp.zero_grad_buffer()
    for param in ddp.module.parameters():
        param.main_grad.fill_(value)


def test_param_groups_no_weight_decay_for_biases_and_norms() -> None:
    model = make_model()
    decay, no_decay = get_param_groups(model)
    assert decay["wd_mult"] == 1.0 and no_decay["wd_mult"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(model.fc1.weight), id(model.fc2.weight)]
    expected_no_decay = [model.fc1.bias, model.norm.weight, model.norm.bias, model.fc2.bias]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in expected_no_decay]


def test_param_groups_skip_frozen_params_and_empty_groups() -> None:
    model = nn.Linear(3, 3, bias=False)
    assert len(get_param_groups(model)) == 1
    model.weight.requires_grad_(False)
    assert get_param_groups(model) == []


@pytest.mark.parametrize("clip_grad", [0.0, 0.05])
def test_fp32_adam_matches_torch_adamw(clip_grad: float) -> None:
    config = dict(
        lr=1e-2, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_eps=1e-6, clip_grad=clip_grad
    )
    ddp, optimizer = wrapped(**config)
    reference = make_model()
    torch_opt = torch.optim.AdamW(
        [
            {"params": [reference.fc1.weight, reference.fc2.weight], "weight_decay": 0.1},
            {
                "params": [
                    reference.fc1.bias,
                    reference.norm.weight,
                    reference.norm.bias,
                    reference.fc2.bias,
                ],
                "weight_decay": 0.0,
            },
        ],
        lr=1e-2,
        betas=(0.8, 0.95),
        eps=1e-6,
        foreach=False,
    )
    for step in range(3):
        optimizer.zero_grad()
        loss_of(ddp, step).backward()
        ddp.finish_grad_sync()
        ok, grad_norm, num_zeros = optimizer.step()

        torch_opt.zero_grad()
        loss_of(reference, step).backward()
        expected_norm = torch.nn.utils.clip_grad_norm_(
            reference.parameters(), clip_grad if clip_grad > 0 else math.inf
        )
        torch_opt.step()

        assert ok and num_zeros == 0
        assert grad_norm == pytest.approx(expected_norm.item(), rel=1e-5)
        if clip_grad > 0:
            assert grad_norm > clip_grad  # clipping really happened
        for (name, param), ref in zip(ddp.module.named_parameters(), reference.parameters()):
            assert param.grad is None
            torch.testing.assert_close(param, ref, rtol=1e-5, atol=1e-6, msg=name)


def test_sgd_matches_torch_sgd_with_l2_weight_decay() -> None:
    ddp, optimizer = wrapped(optimizer="sgd", lr=0.1, sgd_momentum=0.9, weight_decay=0.1, clip_grad=0.0)
    reference = make_model()
    decayed = [reference.fc1.weight, reference.fc2.weight]
    others = [reference.fc1.bias, reference.norm.weight, reference.norm.bias, reference.fc2.bias]
    torch_opt = torch.optim.SGD(
        [{"params": decayed, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
        lr=0.1,
        momentum=0.9,
    )
    for step in range(3):
        optimizer.zero_grad()
        loss_of(ddp, step).backward()
        assert optimizer.step()[0]
        torch_opt.zero_grad()
        loss_of(reference, step).backward()
        torch_opt.step()
    for param, ref in zip(ddp.module.parameters(), reference.parameters()):
        torch.testing.assert_close(param, ref, rtol=1e-5, atol=1e-6)


def test_bf16_keeps_fp32_main_params() -> None:
    """Updates of 1e-4 on weights near 1 vanish in bf16 (spacing 2^-7) but accumulate in the fp32 copies."""
    ddp, optimizer = wrapped(
        torch.bfloat16, optimizer="sgd", lr=1e-4, sgd_momentum=0.0, weight_decay=0.0, clip_grad=0.0, bf16=True
    )
    with torch.no_grad():
        ddp.module.norm.weight.fill_(1.0)
    optimizer.reload_model_params()
    main = optimizer.state_dict()["fp32_from_fp16_params"]
    assert all(m.dtype == torch.float32 for group in main for m in group)
    norm_main = next(m for m in main[1] if m.shape == (8,) and bool((m == 1.0).all()))

    set_main_grads(ddp, 1.0)
    assert optimizer.step()[0]
    assert ddp.module.norm.weight.dtype == torch.bfloat16
    assert bool((ddp.module.norm.weight == 1.0).all())  # the bf16 copy cannot represent 1 - 1e-4
    torch.testing.assert_close(norm_main, torch.full((8,), 1.0 - 1e-4), rtol=0, atol=1e-7)

    for _ in range(99):
        set_main_grads(ddp, 1.0)
        optimizer.step()
    torch.testing.assert_close(norm_main, torch.full((8,), 0.99), rtol=0, atol=1e-5)
    assert torch.equal(ddp.module.norm.weight, norm_main.bfloat16())  # now the bf16 copy moved too
    assert ddp.module.norm.weight[0].item() < 1.0


def test_bf16_training_step_runs_end_to_end() -> None:
    ddp, optimizer = wrapped(torch.bfloat16, lr=1e-2, bf16=True)
    before = [p.detach().clone() for p in ddp.module.parameters()]
    optimizer.zero_grad()
    loss = loss_of(ddp, 0, torch.bfloat16)
    assert optimizer.scale_loss(loss) is loss and optimizer.loss_scale == 1.0
    loss.backward()
    ok, grad_norm, _ = optimizer.step()
    assert ok and grad_norm is not None and grad_norm > 0
    assert all(not torch.equal(b, p) for b, p in zip(before, ddp.module.parameters()))


def test_fp16_unscales_grads_before_the_update() -> None:
    """With scale S the fp16 optimizer sees S*g in main_grad and must update exactly like fp32 with g."""
    config = dict(lr=1e-2, clip_grad=0.5, initial_loss_scale=2.0**10)
    ddp16, opt16 = wrapped(torch.float16, fp16=True, **config)
    ddp32 = DistributedDataParallel(
        make_model(torch.float16).float(), SINGLE
    )  # same (fp16-representable) values
    opt32 = build_optimizer(ddp32, OptimizerConfig(**config), SINGLE)
    assert opt16.loss_scale == 2.0**10
    loss = torch.tensor(0.25)
    assert opt16.scale_loss(loss).item() == 0.25 * 2.0**10
    for step in range(2):
        opt16.zero_grad()
        opt32.zero_grad()
        loss_of(ddp32, step).backward()
        for p16, p32 in zip(ddp16.module.parameters(), ddp32.module.parameters()):
            p16.main_grad.copy_(p32.main_grad * opt16.loss_scale)
        ok16, norm16, _ = opt16.step()
        ok32, norm32, _ = opt32.step()
        assert ok16 and ok32
        assert norm16 == pytest.approx(norm32, rel=1e-6)
    main16 = [m for group in opt16.state_dict()["fp32_from_fp16_params"] for m in group]
    for m, p32 in zip(main16, [p for g in opt32.param_groups for p in g["params"]]):
        torch.testing.assert_close(m, p32, rtol=1e-6, atol=1e-7)


def test_fp16_overflow_skips_step_and_halves_scale_with_hysteresis() -> None:
    ddp, optimizer = wrapped(
        torch.float16, fp16=True, initial_loss_scale=2.0**16, hysteresis=2, loss_scale_window=3
    )
    before = [p.detach().clone() for p in ddp.module.parameters()]
    state_before = copy.deepcopy(optimizer.optimizer.state_dict())

    def step_with(value: float) -> tuple:
        set_main_grads(ddp, 1.0)
        ddp.module.fc2.weight.main_grad[0, 0] = value
        return optimizer.step()

    assert step_with(math.inf) == (False, None, 0)
    assert optimizer.loss_scale == 2.0**16  # first overflow absorbed by hysteresis
    assert step_with(math.nan) == (False, None, 0)
    assert optimizer.loss_scale == 2.0**15
    assert step_with(-math.inf)[0] is False
    assert optimizer.loss_scale == 2.0**14  # hysteresis exhausted: every further overflow halves
    for b, p in zip(before, ddp.module.parameters()):
        assert torch.equal(b, p)
    assert optimizer.optimizer.state_dict()["state"] == state_before["state"] == {}

    for expected in (2.0**14, 2.0**14, 2.0**15):  # grows after loss_scale_window = 3 clean steps
        assert step_with(1.0)[0] is True
        assert optimizer.loss_scale == expected
    assert not all(torch.equal(b, p) for b, p in zip(before, ddp.module.parameters()))
    assert step_with(math.inf)[0] is False
    assert optimizer.loss_scale == 2.0**15  # hysteresis was reset by the growth


def test_constant_loss_scale_never_changes() -> None:
    ddp, optimizer = wrapped(torch.float16, fp16=True, loss_scale=128.0)
    set_main_grads(ddp, math.inf)
    assert optimizer.step()[0] is False
    assert optimizer.loss_scale == 128.0


def test_dynamic_scaler_respects_min_scale() -> None:
    scaler = DynamicGradScaler(initial_scale=4.0, min_scale=2.0, growth_interval=10, hysteresis=1)
    for _ in range(3):
        scaler.update(found_inf=True)
    assert scaler.scale == 2.0
    restored = DynamicGradScaler(initial_scale=1024.0, min_scale=1.0, growth_interval=10, hysteresis=1)
    restored.load_state_dict(scaler.state_dict())
    assert (restored.scale, restored.growth_tracker, restored.hysteresis_tracker) == (2.0, 0, -2)


@pytest.mark.parametrize("dtype,flags", [(torch.float32, {}), (torch.bfloat16, {"bf16": True})])
def test_nan_or_inf_grad_skips_the_step(dtype: torch.dtype, flags: dict) -> None:
    ddp, optimizer = wrapped(dtype, lr=1.0, **flags)
    before = [p.detach().clone() for p in ddp.module.parameters()]
    for bad in (math.nan, math.inf):
        set_main_grads(ddp, 0.5)
        ddp.module.norm.bias.main_grad[3] = bad
        assert optimizer.step() == (False, None, 0)
        for b, p in zip(before, ddp.module.parameters()):
            assert torch.equal(b, p)
    set_main_grads(ddp, 0.5)
    assert optimizer.step()[0] is True
    assert optimizer.loss_scale == 1.0


def test_zero_grad_clears_main_grads() -> None:
    ddp, optimizer = wrapped()
    loss_of(ddp, 0).backward()
    assert ddp.grad_buffer.abs().sum() > 0
    optimizer.zero_grad()
    assert ddp.grad_buffer.abs().sum() == 0
    assert all(p.grad is None for p in ddp.module.parameters())


class _Unwrapped:
    """Looks like DistributedDataParallel (has .module) but its parameters have no main_grad."""

    module = nn.Linear(2, 2)


def test_requires_ddp_and_matching_precision_flags() -> None:
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        MegatronOptimizer(_Unwrapped(), OptimizerConfig(), SINGLE)
    with pytest.raises(ValueError, match="--fp16 or --bf16"):
        wrapped(torch.bfloat16)
    with pytest.raises(ValueError, match="--optimizer"):
        OptimizerConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="mutually exclusive"):
        OptimizerConfig(fp16=True, bf16=True)


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize(
    "dtype,flags", [(torch.float32, {}), (torch.bfloat16, {"bf16": True}), (torch.float16, {"fp16": True})]
)
def test_state_dict_round_trip(dtype: torch.dtype, flags: dict) -> None:
    config = dict(lr=1e-2, initial_loss_scale=2.0**8, loss_scale_window=2, **flags)
    ddp, optimizer = wrapped(dtype, **config)
    for step in range(3):
        set_main_grads(ddp, 0.1 * (step + 1) * optimizer.loss_scale)
        assert optimizer.step()[0]
    state = _roundtrip(optimizer.state_dict())
    if flags:
        assert set(state) == {"optimizer", "fp32_from_fp16_params"} | (
            {"grad_scaler"} if flags.get("fp16") else set()
        )
        assert state["fp32_from_fp16_params"][0][0].dtype == torch.float32
    else:
        assert set(state) == {"state", "param_groups"}

    # A fresh optimizer on a copy of the trained model picks up exactly where the first one is.
    ddp2 = DistributedDataParallel(copy.deepcopy(ddp.module), SINGLE)
    optimizer2 = build_optimizer(ddp2, OptimizerConfig(**config), SINGLE)
    optimizer2.load_state_dict(state)
    assert optimizer2.loss_scale == optimizer.loss_scale
    if flags.get("fp16"):
        assert optimizer2.loss_scale == 2.0**9  # grew once after the 2-step window
    for opt, model in ((optimizer, ddp), (optimizer2, ddp2)):
        set_main_grads(model, -0.2 * opt.loss_scale)
        assert opt.step()[0]
    for p1, p2 in zip(ddp.module.parameters(), ddp2.module.parameters()):
        assert torch.equal(p1, p2)
    if flags:
        main1 = [m for g in optimizer.state_dict()["fp32_from_fp16_params"] for m in g]
        main2 = [m for g in optimizer2.state_dict()["fp32_from_fp16_params"] for m in g]
        assert all(torch.equal(a, b) for a, b in zip(main1, main2))


def test_mixed_precision_state_dict_rejects_other_layout() -> None:
    _, fp32_opt = wrapped()
    _, bf16_opt = wrapped(torch.bfloat16, bf16=True)
    with pytest.raises(ValueError, match="fp32_from_fp16_params"):
        bf16_opt.load_state_dict(fp32_opt.state_dict())


# ---- global-norm clipping with tensor parallelism ----------------------------------------------------------

FULL_SHAPES = {
    "col": (8, 4),
    "row": (4, 8),
    "norm": (4,),
}  # col split on dim 0, row on dim 1, norm duplicated
SPLIT_DIM = {"col": 0, "row": 1}


def full_tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in FULL_SHAPES.items()}


def shard(full: dict[str, torch.Tensor], tp_rank: int, tp_size: int) -> dict[str, torch.Tensor]:
    return {
        name: t.chunk(tp_size, dim=SPLIT_DIM[name])[tp_rank] if name in SPLIT_DIM else t
        for name, t in full.items()
    }


class TPShard(nn.Module):
    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.col = nn.Parameter(values["col"].clone())
        self.row = nn.Parameter(values["row"].clone())
        self.norm = nn.Parameter(values["norm"].clone())
        self.col.tensor_model_parallel = True
        self.row.tensor_model_parallel = True


def clipped_sgd_step(values: dict, grads: dict, parallel: object) -> tuple[float, dict[str, torch.Tensor]]:
    """One SGD step (lr 1, no momentum/decay) with clip_grad 1: returns (grad norm, new parameter values)."""
    ddp = DistributedDataParallel(TPShard(values), parallel)
    config = OptimizerConfig(optimizer="sgd", lr=1.0, sgd_momentum=0.0, weight_decay=0.0, clip_grad=1.0)
    optimizer = build_optimizer(ddp, config, parallel)
    optimizer.zero_grad()
    for name, param in ddp.module.named_parameters():
        param.main_grad.copy_(grads[name])
    ddp.finish_grad_sync()  # every DP rank holds the same grads: the average leaves them unchanged
    ok, grad_norm, _ = optimizer.step()
    assert ok
    return grad_norm, {name: p.detach().clone() for name, p in ddp.module.named_parameters()}


def _tp_clip_body(
    rank: int, world_size: int, expected_norm: float, expected: dict[str, torch.Tensor]
) -> None:
    parallel = initialize_model_parallel(2)
    values = shard(full_tensors(0), parallel.tp_rank, 2)
    grads = shard(full_tensors(1), parallel.tp_rank, 2)
    grad_norm, new_values = clipped_sgd_step(values, grads, parallel)
    assert grad_norm == pytest.approx(expected_norm, rel=1e-6)
    for name, value in shard(expected, parallel.tp_rank, 2).items():
        torch.testing.assert_close(new_values[name], value, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("world_size", [2, 4])
def test_global_norm_clipping_with_tensor_parallelism_matches_single_process(world_size: int) -> None:
    values, grads = full_tensors(0), full_tensors(1)
    expected_norm = math.sqrt(sum(g.double().square().sum().item() for g in grads.values()))
    assert expected_norm > 1.0  # so the step clips
    norm, expected = clipped_sgd_step(values, grads, SINGLE)
    assert norm == pytest.approx(expected_norm, rel=1e-6)
    for name in values:  # SGD with lr 1: new = old - grad * clip / (norm + 1e-6)
        torch.testing.assert_close(expected[name], values[name] - grads[name] / (expected_norm + 1e-6))
    run_distributed(_tp_clip_body, world_size, args=(expected_norm, expected))
