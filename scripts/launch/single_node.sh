#!/usr/bin/env bash
# One node, NPROC processes (GPUs, or CPU processes on gloo), tensor x pipeline x data parallel.
#   bash scripts/launch/single_node.sh gpt            # tiny GPT on synthetic data, 2 processes
#   NPROC=8 TP=2 PP=2 NUM_LAYERS=4 bash scripts/launch/single_node.sh gpt   # 3D: TP 2 x PP 2 x DP 2
#   NPROC=8 TP=2 DATA_PATH=data/corpus_text_document VOCAB_FILE=vocab.json MERGE_FILE=merges.txt \
#     NUM_LAYERS=24 HIDDEN=1024 HEADS=16 SEQ=1024 MBS=8 GBS=512 ITERS=100000 EXTRA_ARGS=--bf16 \
#     bash scripts/launch/single_node.sh gpt
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MODEL="${1:-gpt}"
source "$ROOT/scripts/launch/model_args.sh"
cd "$ROOT"
exec torchrun --standalone --nnodes 1 --nproc_per_node "${NPROC:-2}" "$ENTRY" "${ARGS[@]}"
