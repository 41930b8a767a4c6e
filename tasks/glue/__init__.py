"""GLUE sentence-pair classification (MNLI, QQP): BERT fine-tuning."""
