"""Megatron-style pretraining: tensor + data parallel GPT and BERT on torch.distributed."""

__version__ = "0.1.0"
