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

Distributed optimizer (ZeRO-1, `use_distributed_optimizer=True`). Each bucket is padded with zeros to a
multiple of D elements and cut into D contiguous shards of S = padded/D elements, ignoring parameter
boundaries: DP rank r owns elements [r S, (r + 1) S) of every bucket (with a single bucket, the default
for models under 40M parameters per rank, that is the whole buffer cut into D contiguous shards). A
complete bucket is divided by D and reduce-scattered (SUM) instead of all-reduced, so after
`finish_grad_sync()` rank r's shard holds

    main_grad[r S : (r + 1) S] = (1/D) * sum_r' g_r'[r S : (r + 1) S]

and the rest of the bucket holds stale local values that nobody reads. The model's parameters then live
in `param_buffer`, one tensor of the model's dtype with the same layout as the gradient buffer (each
parameter's `.data` is a view into it), so after the optimizer updated rank r's shard of the parameters,
one all-gather per bucket,

    param_buffer[bucket] = concat_r' param_buffer[bucket][r' S : (r' + 1) S],

gives every rank the updated weights (`start_param_gather`). With `overlap_param_gather` the all-gathers
run asynchronously and a forward pre-hook on each module waits only for the buckets holding that
module's parameters, so the gather overlaps with the next forward pass.

Sequence parallelism. A parameter marked `sequence_parallel` (duplicated over TP but applied to this
rank's s/t positions only: layernorms, row-parallel biases) has on each TP rank the gradient of its own
positions; `finish_grad_sync()` completes it with one all-reduce (SUM) over the TP group of all such
gradients, flattened together, after the DP reduction (both are sums, so the order does not matter).

Tied word embedding under pipelining. A parameter marked `pipeline_tied` (the first stage's input
embedding, the last stage's `word_embeddings_for_head`) is one weight held on two stages: its gradient is
summed over the embedding group, main_grad <- main_grad(first stage) + main_grad(last stage), inside
`finish_grad_sync()`. Without the distributed optimizer this all-reduce runs after the DP all-reduce (both
are sums, so the order does not matter). With it, it must run BEFORE the DP reduce-scatter, on the whole
local gradient: the copy sits at different offsets of the two stages' buckets, so after the
reduce-scatter the two stages' shards of it belong to different DP ranks and do not line up. The bucket
holding that parameter is therefore not launched from backward; `finish_grad_sync()` sums the copies over
the embedding group, then reduce-scatters it. Both stages' DP rank d hold the same summed gradient
before the reduce-scatter, so the averaged shards, and the updates, agree.

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

from megatron.parallel.collectives import all_gather_into, all_reduce, reduce_scatter_into
from megatron.parallel.state import ParallelState


class _Bucket:
    """A contiguous slice of the gradient buffer holding the main_grad of a few parameters.

    `offsets[i]` is where params[i] starts inside `data`; `data` may end with zero padding (sharded case).
    """

    def __init__(self, data: Tensor, params: list[nn.Parameter], offsets: list[int], sharded: bool) -> None:
        self.data = data
        self.params = params
        self.offsets = offsets
        self.sharded = sharded
        self.param_data: Optional[Tensor] = None  # the same slice of the parameter buffer (sharded case)
        self.ready: set[nn.Parameter] = set()
        self.handle: Optional[dist.Work] = None
        self.gather_handle: Optional[dist.Work] = None
        self.reduced = False
        # Holds a pipeline-tied parameter under the distributed optimizer: reduced in finish_grad_sync only.
        self.deferred = sharded and any(getattr(p, "pipeline_tied", False) for p in params)

    def shard_range(self, parallel: ParallelState) -> tuple[int, int]:
        """[start, end) of this DP rank's shard inside the bucket: S = numel / D elements at dp_rank * S."""
        size = self.data.numel() // parallel.dp_size
        return parallel.dp_rank * size, (parallel.dp_rank + 1) * size

    def reset(self) -> None:
        self.ready.clear()
        self.handle = None
        self.reduced = False

    def launch_reduce(self, parallel: ParallelState) -> None:
        """Average this bucket over the DP group: divide by D, then start an asynchronous SUM all-reduce,
        or, sharded, a SUM reduce-scatter into this rank's shard."""
        self.data.div_(parallel.dp_size)
        if self.sharded:
            start, end = self.shard_range(parallel)
            self.handle = reduce_scatter_into(
                self.data[start:end], self.data, parallel.dp_group, async_op=True
            )
        else:
            self.handle = dist.all_reduce(
                self.data, op=dist.ReduceOp.SUM, group=parallel.dp_group, async_op=True
            )
        self.reduced = True

    def launch_param_gather(self, parallel: ParallelState) -> None:
        """Start the all-gather of every rank's shard of the parameters into the whole bucket."""
        start, end = self.shard_range(parallel)
        self.gather_handle = all_gather_into(
            self.param_data, self.param_data[start:end], parallel.dp_group, async_op=True
        )

    def wait_param_gather(self) -> None:
        if self.gather_handle is not None:
            self.gather_handle.wait()
            self.gather_handle = None


def _bucket_param_lists(params: list[nn.Parameter], bucket_size: int) -> list[list[nn.Parameter]]:
    """Consecutive groups of `params`, each closed as soon as it holds at least `bucket_size` elements."""
    groups: list[list[nn.Parameter]] = [[]]
    numel = 0
    for param in params:
        if numel >= bucket_size:
            groups.append([])
            numel = 0
        groups[-1].append(param)
        numel += param.numel()
    return groups if groups[0] else []


class DistributedDataParallel(nn.Module):
    """Wrap `module` so that its gradients land in fp32 `main_grad` buffers, averaged over the DP group.

    `bucket_size` is in elements. `overlap_grad_reduce=False` defers every all-reduce to
    `finish_grad_sync()` (no overlap with backward; the result is identical). `use_distributed_optimizer`
    shards each bucket over the DP group (reduce-scatter, parameter buffer; see the module docstring) and
    `overlap_param_gather` overlaps the parameter all-gather with the next forward.
    """

    def __init__(
        self,
        module: nn.Module,
        parallel: ParallelState,
        bucket_size: int = 40_000_000,
        overlap_grad_reduce: bool = True,
        use_distributed_optimizer: bool = False,
        overlap_param_gather: bool = False,
    ) -> None:
        super().__init__()
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be a positive number of elements, got {bucket_size}")
        if overlap_param_gather and not use_distributed_optimizer:
            raise ValueError("--overlap-param-gather needs --use-distributed-optimizer")
        self.module = module
        self.parallel = parallel
        self.overlap_grad_reduce = overlap_grad_reduce
        self.use_distributed_optimizer = use_distributed_optimizer
        self.overlap_param_gather = overlap_param_gather
        self._sync_enabled = True

        params = [p for p in module.parameters() if p.requires_grad][::-1]
        self._sequence_parallel_params = [p for p in params if getattr(p, "sequence_parallel", False)]
        self._pipeline_tied_params = [p for p in params if getattr(p, "pipeline_tied", False)]
        groups = _bucket_param_lists(params, bucket_size)
        multiple = parallel.dp_size if use_distributed_optimizer else 1
        sizes = [-(-sum(p.numel() for p in g) // multiple) * multiple for g in groups]  # padded up
        device = params[0].device if params else torch.device("cpu")
        self.grad_buffer = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
        self.param_buffer: Optional[Tensor] = None
        if use_distributed_optimizer:
            dtypes = {p.dtype for p in params}
            if len(dtypes) > 1:
                raise ValueError(
                    f"the distributed optimizer needs one parameter dtype, the model has {dtypes}"
                )
            self.param_buffer = torch.zeros(sum(sizes), dtype=params[0].dtype, device=device)

        self.buckets: list[_Bucket] = []
        self._bucket_of: dict[nn.Parameter, _Bucket] = {}
        bucket_start = 0
        for group, size in zip(groups, sizes):
            offsets, offset = [], 0
            for param in group:
                offsets.append(offset)
                where = slice(bucket_start + offset, bucket_start + offset + param.numel())
                param.main_grad = self.grad_buffer[where].view(param.shape)
                if self.param_buffer is not None:
                    self.param_buffer[where].copy_(param.data.view(-1))
                    param.data = self.param_buffer[where].view(param.shape)
                offset += param.numel()
                param.register_post_accumulate_grad_hook(self._grad_ready_hook)
            bucket = _Bucket(
                self.grad_buffer[bucket_start : bucket_start + size], group, offsets, multiple > 1
            )
            if self.param_buffer is not None:
                bucket.param_data = self.param_buffer[bucket_start : bucket_start + size]
            self.buckets.append(bucket)
            self._bucket_of.update((p, bucket) for p in group)
            bucket_start += size
        if overlap_param_gather:
            for submodule in module.modules():
                if any(p in self._bucket_of for p in submodule.parameters(recurse=False)):
                    submodule.register_forward_pre_hook(self._wait_for_own_params_hook)

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
        complete = len(bucket.ready) == len(bucket.params)
        if self.overlap_grad_reduce and self.parallel.dp_size > 1 and complete and not bucket.deferred:
            bucket.launch_reduce(self.parallel)

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
        """Launch the DP reductions not yet started and wait for all; then main_grad is DP-averaged. The
        copies of a pipeline-tied embedding are summed over the embedding group (before the reduce-scatter
        with the distributed optimizer, after the all-reduce without). Then the gradients of
        sequence-parallel parameters are summed over the TP group."""
        if self.use_distributed_optimizer:
            self._all_reduce_pipeline_tied_grads()
        if self.parallel.dp_size > 1:
            for bucket in self.buckets:
                if not bucket.reduced:
                    bucket.launch_reduce(self.parallel)
            for bucket in self.buckets:
                if bucket.handle is not None:
                    bucket.handle.wait()
                    bucket.handle = None
        if not self.use_distributed_optimizer:
            self._all_reduce_pipeline_tied_grads()
        self._all_reduce_sequence_parallel_grads()

    def _all_reduce_pipeline_tied_grads(self) -> None:
        """main_grad <- sum over the embedding group (first and last pipeline stage) of main_grad, for the
        copies of the tied word embedding; a no-op without pipelining."""
        for param in self._pipeline_tied_params:
            all_reduce(param.main_grad, self.parallel.embedding_group)

    def _all_reduce_sequence_parallel_grads(self) -> None:
        """main_grad <- sum over TP ranks of main_grad, for every parameter marked `sequence_parallel`."""
        grads = [param.main_grad for param in self._sequence_parallel_params]
        if not grads or self.parallel.tp_group is None:
            return
        flat = all_reduce(torch.cat([grad.view(-1) for grad in grads]), self.parallel.tp_group)
        torch._foreach_copy_(
            grads, [part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]), grads)]
        )

    def start_param_gather(self) -> None:
        """All-gather every bucket's updated parameter shards (distributed optimizer): asynchronously with
        overlap_param_gather (forward pre-hooks wait), otherwise waited for here."""
        if self.parallel.dp_size == 1:
            return
        for bucket in self.buckets:
            bucket.launch_param_gather(self.parallel)
        if not self.overlap_param_gather:
            self.finish_param_gather()

    def finish_param_gather(self) -> None:
        """Wait for every parameter all-gather still in flight (before a checkpoint or the next step)."""
        for bucket in self.buckets:
            bucket.wait_param_gather()

    def _wait_for_own_params_hook(self, module: nn.Module, args: Any) -> None:
        """Forward pre-hook: wait for the all-gathers of the buckets holding this module's parameters."""
        for param in module.parameters(recurse=False):
            bucket = self._bucket_of.get(param)
            if bucket is not None:
                bucket.wait_param_gather()

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
