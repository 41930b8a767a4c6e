"""A pipeline stage of a GPT that answers like the whole model, for generation and scoring under PP.

`PipelinedGPT(stage_model, parallel, hidden_size, vocab, dtype)` wraps this rank's stage (a GPTModel built
with parallel_output=False and a StageLayout). Its forward(tokens, position_ids, inference_params=...)
runs one microbatch through the pipeline:

    stage 0:   x = embedding + its layers           -> send x to stage 1
    stage s:   receive x [batch, seq, hidden]; x = its layers(x)   -> send to stage s + 1
    last:      logits [batch, seq, V] = output layer(final layernorm(its layers(x)))
               (or, given labels, the per-token losses [batch, seq])
    then every stage gets the last stage's result (one broadcast over the pipeline group)

so every rank of the pipeline returns the same full logits, the generation loop runs unchanged on every
rank, and each stage keeps the KV cache of its own layers in `inference_params`. The shapes of the
transfers follow from the tokens (every rank holds them), so nothing else is exchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron.model.transformer import InferenceParams
from megatron.parallel.p2p import P2PConfig, communicate
from megatron.parallel.state import ParallelState


class PipelinedGPT(nn.Module):
    """This rank's stage of a GPT, called like the whole model (see the module docstring)."""

    parallel_output = False

    def __init__(
        self,
        stage_model: nn.Module,
        parallel: ParallelState,
        hidden_size: int,
        padded_vocab_size: int,
        position_table_size: Optional[int],
    ) -> None:
        super().__init__()
        self.stage_model = stage_model
        self.parallel = parallel
        self.hidden_size = hidden_size
        self.padded_vocab_size = padded_vocab_size
        self.position_table_size = position_table_size

    def forward(
        self,
        tokens: Tensor,
        position_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        inference_params: Optional[InferenceParams] = None,
    ) -> Tensor:
        """tokens, position_ids [batch, seq] -> full-vocabulary logits [batch, seq, V] on every stage, or
        with `labels` the fp32 per-token losses [batch, seq] (as GPTModel.forward)."""
        parallel = self.parallel
        dtype = next(self.stage_model.parameters()).dtype
        p2p = P2PConfig((*tokens.shape, self.hidden_size), dtype, tokens.device)
        if not parallel.is_pp_first:
            self.stage_model.set_input_tensor(communicate(parallel, p2p, recv_prev=True)[0])
        output = self.stage_model(tokens, position_ids, attention_mask, labels, inference_params)
        if not parallel.is_pp_last:
            communicate(parallel, p2p, send_next=output)
            shape = tokens.shape if labels is not None else (*tokens.shape, self.padded_vocab_size)
            output = torch.empty(
                shape, dtype=torch.float32 if labels is not None else dtype, device=tokens.device
            )
        dist.broadcast(output, src=parallel.pipeline_ranks[-1], group=parallel.pp_group)
        return output
