"""RACE reading comprehension: BERT multiple-choice fine-tuning."""
