"""Data parallelism with fp32 gradient buffers, in the manner of Megatron-core's DistributedDataParallel.

Every trainable parameter `p` gets `p.main_grad`: an fp32 view into one contiguous buffer. The buffer
holds the parameters in reverse order of `module.parameters()` (roughly the order in which backward
produces their gradients) and is cut into buckets of about `bucket_size` elements.

Gradient accumulation. A post-accumulate-grad hook runs once per parameter per backward pass, after
autograd has summed all contributions to `p.grad` (a parameter used twice in forward, or a tied weight,
still fires once). The hook does

    p.main_grad += float32(p.grad);   p.grad = None

so over microbatches k = 1..K the buffer holds  sum_k dL_k/dp  in fp32 whatever the model's dtype
(bf16/fp16 models accumulate in fp32, BLOOM's BF16Optimizer semantics), and no low-precision `.grad`
outlives the hook.

Data-parallel reduction. With D = dp_size ranks each holding the gradient g_r of its own share of the
global batch, after `finish_grad_sync()` every rank holds

    main_grad = (1/D) * sum_r g_r          (each bucket is divided by D, then all-reduced with SUM)

which, for a loss averaged over each rank's samples, is the gradient of the loss averaged over the whole
global batch. Outside `no_sync()`, a bucket's all-reduce is launched asynchronously as soon as the hooks
of all its parameters have run, so communication overlaps with the rest of backward; `finish_grad_sync()`
launches the buckets still pending (parameters that got no gradient, or overlap disabled) and waits for
all of them. With D = 1 there is no communication at all.

One training iteration:

    ddp.zero_grad_buffer()
    for microbatch in microbatches[:-1]:
        with ddp.no_sync():
            loss(microbatch).backward()      # grads only accumulate into main_grad
    loss(microbatches[-1]).backward()        # buckets all-reduce while backward runs
    ddp.finish_grad_sync()                   # main_grad = DP-averaged sum over microbatches
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron.parallel.collectives import all_reduce
from megatron.parallel.state import ParallelState


class _Bucket:
    """A contiguous slice of the gradient buffer holding the main_grad of a few parameters."""

    def __init__(self, data: Tensor, params: list[nn.Parameter]) -> None:
        self.data = data
        self.params = params
        self.ready: set[nn.Parameter] = set()
        self.handle: Optional[dist.Work] = None
        self.reduced = False

    def reset(self) -> None:
        self.ready.clear()
        self.handle = None
        self.reduced = False

    def launch_all_reduce(self, parallel: ParallelState) -> None:
        """Average this bucket over the DP group: divide by D, then start an asynchronous SUM all-reduce."""
        self.data.div_(parallel.dp_size)
        self.handle = dist.all_reduce(self.data, op=dist.ReduceOp.SUM, group=parallel.dp_group, async_op=True)
        self.reduced = True


class DistributedDataParallel(nn.Module):
    """Wrap `module` so that its gradients land in fp32 `main_grad` buffers, averaged over the DP group.

    `bucket_size` is in elements. `overlap_grad_reduce=False` defers every all-reduce to
    `finish_grad_sync()` (no overlap with backward; the result is identical).
    """

    def __init__(
        self,
        module: nn.Module,
        parallel: ParallelState,
        bucket_size: int = 40_000_000,
        overlap_grad_reduce: bool = True,
    ) -> None:
        super().__init__()
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be a positive number of elements, got {bucket_size}")
        self.module = module
        self.parallel = parallel
        self.overlap_grad_reduce = overlap_grad_reduce
        self._sync_enabled = True

        params = [p for p in module.parameters() if p.requires_grad][::-1]
        numel = sum(p.numel() for p in params)
        device = params[0].device if params else torch.device("cpu")
        self.grad_buffer = torch.zeros(numel, dtype=torch.float32, device=device)

        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[nn.Parameter, _Bucket] = {}
        offset, bucket_start, bucket_params = 0, 0, []
        for index, param in enumerate(params):
            param.main_grad = self.grad_buffer[offset : offset + param.numel()].view(param.shape)
            offset += param.numel()
            bucket_params.append(param)
            if offset - bucket_start >= bucket_size or index == len(params) - 1:
                bucket = _Bucket(self.grad_buffer[bucket_start:offset], bucket_params)
                self.buckets.append(bucket)
                self._bucket_of.update((p, bucket) for p in bucket_params)
                bucket_start, bucket_params = offset, []
            param.register_post_accumulate_grad_hook(self._grad_ready_hook)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def _grad_ready_hook(self, param: nn.Parameter) -> None:
        """Move param.grad into param.main_grad (fp32); start the bucket's all-reduce once it is complete."""
        bucket = self._bucket_of[param]
        if bucket.reduced or param in bucket.ready:
            raise RuntimeError(
                "a parameter received a second gradient since the last zero_grad_buffer(): run the backward "
                "of every microbatch but the last inside DistributedDataParallel.no_sync(), and call "
                "zero_grad_buffer() before the next iteration"
            )
        param.main_grad.add_(param.grad)
        param.grad = None
        if not self._sync_enabled:
            return
        bucket.ready.add(param)
        if self.overlap_grad_reduce and self.parallel.dp_size > 1 and len(bucket.ready) == len(bucket.params):
            bucket.launch_all_reduce(self.parallel)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Within this context backward only accumulates into main_grad; nothing is communicated."""
        previous = self._sync_enabled
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = previous

    def finish_grad_sync(self) -> None:
        """Launch the all-reduces not yet started and wait for all; then main_grad is DP-averaged."""
        if self.parallel.dp_size == 1:
            return
        for bucket in self.buckets:
            if not bucket.reduced:
                bucket.launch_all_reduce(self.parallel)
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
                bucket.handle = None

    def zero_grad_buffer(self) -> None:
        """Zero every main_grad (and drop any stray param.grad) before the next iteration's backward."""
        for bucket in self.buckets:
            if bucket.handle is not None:
                bucket.handle.wait()
            bucket.reset()
        self.grad_buffer.zero_()
        for bucket in self.buckets:
            for param in bucket.params:
                param.grad = None

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The wrapped module's state dict (keys without a 'module.' prefix)."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load into the wrapped module (keys without a 'module.' prefix)."""
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)


def all_reduce_embedding_grads(module: nn.Module, parallel: ParallelState) -> None:
    """Keep the two copies of the tied word embedding equal: on the first and the last pipeline stage,

        main_grad <- main_grad(first stage's word_embeddings) + main_grad(last stage's word_embeddings_for_head)

    one SUM all-reduce over the embedding group, after the data-parallel reduction. Both copies then get
    the gradient of the one shared weight and the same optimizer update. A no-op without pipelining.
    """
    for param in module.parameters():
        if getattr(param, "pipeline_tied", False):
            all_reduce(param.main_grad, parallel.embedding_group)
