"""DistributedDataParallel: fp32 main_grad buffers, bucketed DP all-reduce, no_sync accumulation."""

import pytest
import torch
from torch import nn

from megatron.distributed import DistributedDataParallel
from megatron.parallel.state import ParallelState, initialize_model_parallel, single_process_state
from tests.distributed_utils import run_distributed

GLOBAL_BATCH = 8
MICROBATCHES = 2


class TiedNet(nn.Module):
    """A small net whose input projection is reused (transposed) as the output layer, plus an unused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 10)
        self.norm = nn.LayerNorm(10)
        self.hidden = nn.Linear(10, 10)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.norm(self.proj(x)))
        h = h + torch.tanh(self.hidden(h))
        h = torch.tanh(self.hidden(h))  # `hidden` used twice: autograd sums, the hook fires once
        return h @ self.proj.weight  # tied: back to 6 features with the input projection's weight


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 6, generator=gen), torch.randn(GLOBAL_BATCH, 6, generator=gen)


def make_model(dtype: torch.dtype = torch.float32) -> TiedNet:
    torch.manual_seed(0)
    return TiedNet().to(dtype)


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def reference_grads() -> dict[str, torch.Tensor]:
    """Single-process gradients of the loss averaged over the whole global batch."""
    model = make_model()
    x, y = make_data()
    loss_fn(model, x, y).backward()
    return {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


def train_one_iteration(
    ddp: DistributedDataParallel, x: torch.Tensor, y: torch.Tensor, microbatches: int
) -> None:
    """Megatron's schedule: all microbatches but the last under no_sync, each loss divided by their number."""
    ddp.zero_grad_buffer()
    for i, (xm, ym) in enumerate(zip(x.chunk(microbatches), y.chunk(microbatches))):
        if i < microbatches - 1:
            with ddp.no_sync():
                (loss_fn(ddp, xm, ym) / microbatches).backward()
        else:
            (loss_fn(ddp, xm, ym) / microbatches).backward()


def _dp_body(rank: int, world_size: int, expected: dict[str, torch.Tensor]) -> None:
    parallel = initialize_model_parallel(1)
    assert parallel.dp_size == world_size
    for overlap in (True, False):
        _check_dp_grads(rank, world_size, parallel, overlap, expected)


def _check_dp_grads(
    rank: int, world_size: int, parallel: ParallelState, overlap: bool, expected: dict[str, torch.Tensor]
) -> None:
    ddp = DistributedDataParallel(make_model(), parallel, bucket_size=20, overlap_grad_reduce=overlap)
    assert len(ddp.buckets) == 4
    x, y = make_data()
    shard = GLOBAL_BATCH // world_size
    x, y = x[rank * shard : (rank + 1) * shard], y[rank * shard : (rank + 1) * shard]
    for _ in range(2):  # the second iteration checks that zero_grad_buffer resets everything
        train_one_iteration(ddp, x, y, MICROBATCHES)
        if world_size > 1:
            # With overlap every bucket whose params all got a gradient is already in flight; the bucket
            # holding the unused layer only gets launched by finish_grad_sync.
            launched = [b.reduced for b in ddp.buckets]
            unused_bucket = ddp._bucket_of[ddp.module.unused.weight]
            assert launched == [overlap and b is not unused_bucket for b in ddp.buckets]
        ddp.finish_grad_sync()
        for name, param in ddp.module.named_parameters():
            assert param.grad is None
            assert param.main_grad.dtype == torch.float32
            torch.testing.assert_close(param.main_grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_dp_averaged_grads_equal_full_batch_grads(world_size: int) -> None:
    """Both with overlap (buckets launched during backward) and without (all launched at the end)."""
    run_distributed(_dp_body, world_size, args=(reference_grads(),))


def test_no_sync_accumulation_equals_one_big_batch() -> None:
    expected = reference_grads()
    ddp = DistributedDataParallel(make_model(), single_process_state(), bucket_size=50)
    x, y = make_data()
    train_one_iteration(ddp, x, y, microbatches=4)
    ddp.finish_grad_sync()
    for name, param in ddp.module.named_parameters():
        torch.testing.assert_close(param.main_grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_main_grads_are_views_of_one_buffer_in_reverse_order() -> None:
    ddp = DistributedDataParallel(make_model(), single_process_state(), bucket_size=100)
    params = list(ddp.module.parameters())
    assert ddp.grad_buffer.numel() == sum(p.numel() for p in params)
    offsets = [p.main_grad.data_ptr() - ddp.grad_buffer.data_ptr() for p in params]
    assert offsets == sorted(offsets, reverse=True)  # last parameter first (backward order)
    assert offsets[-1] == 0
    assert sum(b.data.numel() for b in ddp.buckets) == ddp.grad_buffer.numel()
    assert all(b.data.numel() >= 100 for b in ddp.buckets[:-1])


def test_second_backward_without_no_sync_is_an_error() -> None:
    ddp = DistributedDataParallel(make_model(), single_process_state())
    x, y = make_data()
    loss_fn(ddp, x, y).backward()
    with pytest.raises(RuntimeError, match="no_sync"):
        loss_fn(ddp, x, y).backward()


def test_bf16_model_accumulates_grads_in_fp32() -> None:
    """Summing many bf16 microbatch gradients in fp32 stays exact where bf16 accumulation drifts."""
    microbatches = 64
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(microbatches, 6, generator=gen), torch.randn(microbatches, 6, generator=gen)

    # Exact (float64) sum of the bf16 gradient of each microbatch taken separately.
    single = make_model(torch.bfloat16)
    exact = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in single.named_parameters()}
    for i in range(microbatches):
        single.zero_grad(set_to_none=True)
        loss_fn(single, x[i : i + 1].bfloat16(), y[i : i + 1].bfloat16()).backward()
        for n, p in single.named_parameters():
            if p.grad is not None:
                exact[n] += p.grad.double()

    # Plain bf16 autograd accumulation into param.grad.
    plain = make_model(torch.bfloat16)
    for i in range(microbatches):
        loss_fn(plain, x[i : i + 1].bfloat16(), y[i : i + 1].bfloat16()).backward()

    ddp = DistributedDataParallel(make_model(torch.bfloat16), single_process_state())
    ddp.zero_grad_buffer()
    for i in range(microbatches):
        with ddp.no_sync():
            loss_fn(ddp, x[i : i + 1].bfloat16(), y[i : i + 1].bfloat16()).backward()

    name = "hidden.weight"
    main_grad = ddp.module.get_parameter(name).main_grad
    assert main_grad.dtype == torch.float32
    fp32_error = (main_grad.double() - exact[name]).abs().max().item()
    bf16_error = (plain.get_parameter(name).grad.double() - exact[name]).abs().max().item()
    scale = exact[name].abs().max().item()
    assert fp32_error <= 1e-5 * scale, (fp32_error, scale)
    assert bf16_error > 1e-3 * scale, (bf16_error, scale)


def test_state_dict_passes_through_without_prefix() -> None:
    model = make_model()
    ddp = DistributedDataParallel(model, single_process_state())
    assert list(ddp.state_dict()) == list(model.state_dict())
    other = make_model()
    with torch.no_grad():
        other.proj.weight.add_(1.0)
    ddp.load_state_dict(other.state_dict())
    torch.testing.assert_close(model.proj.weight, other.proj.weight)
    assert ddp(torch.ones(1, 6)).shape == (1, 6)
