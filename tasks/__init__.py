"""Downstream tasks (Megatron-LM's tasks/): zero-shot GPT evaluation and BERT fine-tuning; run tasks/main.py."""
