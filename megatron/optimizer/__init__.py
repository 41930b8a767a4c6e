"""Optimizer: param groups, fp16/bf16 mixed precision with fp32 main params, loss scaling, grad clipping.

optimizer = build_optimizer(ddp_model, OptimizerConfig(lr=3e-4, bf16=True), parallel)
optimizer.zero_grad()
...backward of optimizer.scale_loss(loss) over microbatches; ddp_model.finish_grad_sync()...
update_successful, grad_norm, num_zeros_in_grad = optimizer.step()
"""

from megatron.optimizer.config import OptimizerConfig
from megatron.optimizer.grad_scaler import ConstantGradScaler, DynamicGradScaler
from megatron.optimizer.optimizer import MegatronOptimizer, build_optimizer, get_param_groups

__all__ = [
    "ConstantGradScaler",
    "DynamicGradScaler",
    "MegatronOptimizer",
    "OptimizerConfig",
    "build_optimizer",
    "get_param_groups",
]
