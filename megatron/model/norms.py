"""RMSNorm (Zhang & Sennrich 2019), the normalisation of the Llama family.

    y = x / sqrt(mean(x^2) + eps) * weight    over the last dimension, no mean subtraction and no bias

Computed in fp32 and returned in the weight's dtype, like megatron.model.transformer.LayerNorm. It is
duplicated on every TP rank (each sees the full hidden vector). The parameter is `weight`, so the checkpoint
keys are those of LayerNorm without `.bias` (`input_layernorm.weight`, ...), as in Megatron-LM.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.RMSNorm):
    def forward(self, x: Tensor) -> Tensor:
        y = F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps)
        return y.to(self.weight.dtype)
