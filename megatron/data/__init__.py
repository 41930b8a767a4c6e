"""Data pipeline: `.bin`/`.idx` token files -> GPT/BERT samples -> blends -> data-parallel micro batches.

indexed_dataset  Megatron-LM's memory-mapped `.bin`/`.idx` format: IndexedDatasetBuilder, IndexedDataset
gpt_dataset      GPTDataset and build_train_valid_test_datasets for --data-path / --split
bert_dataset     BertDataset (sentence pairs, masking) and its build_train_valid_test_datasets
blended_dataset  BlendedDataset: Megatron's greedy weighted mixture
mock_dataset     synthetic GPT/BERT samples (--mock-data)
samplers         resumable, data-parallel batch samplers and build_data_loader
helpers          the vectorised index builders; index_cache caches their output as .npy
dataset_utils    --split and --data-path parsing, train/valid/test assembly shared by GPT and BERT
"""
