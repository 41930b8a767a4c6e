"""GPT and BERT with intra-layer tensor parallelism (Megatron-LM's model/)."""

from megatron.model.bert import BertModel
from megatron.model.config import TransformerConfig
from megatron.model.gpt import GPTModel

__all__ = ["BertModel", "GPTModel", "TransformerConfig"]
