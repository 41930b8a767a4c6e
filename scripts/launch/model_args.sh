#!/usr/bin/env bash
# Sourced by the launch scripts: fills the bash array ARGS for MODEL=gpt|bert from environment variables.
# Defaults give a tiny model on synthetic data, so every launch script runs as shown on a CPU laptop.
#   DATA_PATH   dataset prefix(es) from tools/preprocess_data.py  (default: --mock-data)
#   VOCAB_FILE, MERGE_FILE   tokenizer files (default: NullTokenizer with VOCAB_SIZE ids)
#   TP (tensor-parallel size), PP (pipeline-parallel size; TP x PP must divide the process count), NUM_LAYERS, HIDDEN, HEADS, SEQ, MBS, GBS, ITERS, LR, SAVE, LOAD, EXTRA_ARGS
set -euo pipefail
MODEL="${MODEL:-gpt}"
ARGS=(
  --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}"
  --num-layers "${NUM_LAYERS:-2}" --hidden-size "${HIDDEN:-64}" --num-attention-heads "${HEADS:-4}"
  --seq-length "${SEQ:-64}" --max-position-embeddings "${SEQ:-64}"
  --micro-batch-size "${MBS:-4}" --global-batch-size "${GBS:-8}"
  --train-iters "${ITERS:-20}" --lr "${LR:-1e-3}" --min-lr 1e-5 --lr-decay-style cosine --lr-warmup-iters 2
  --weight-decay 0.01 --clip-grad 1.0
  --log-interval "${LOG_INTERVAL:-5}" --eval-interval "${EVAL_INTERVAL:-10}" --eval-iters "${EVAL_ITERS:-2}"
  --split 949,50,1
)
if [ -n "${DATA_PATH:-}" ]; then
  # shellcheck disable=SC2206
  ARGS+=(--data-path ${DATA_PATH})
else
  ARGS+=(--mock-data)
fi
if [ -n "${VOCAB_FILE:-}" ]; then
  if [ "$MODEL" = gpt ]; then
    ARGS+=(--tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE")
  else
    ARGS+=(--tokenizer-type BertWordPieceLowerCase --vocab-file "$VOCAB_FILE")
  fi
else
  ARGS+=(--tokenizer-type NullTokenizer --vocab-size "${VOCAB_SIZE:-1024}")
fi
[ -n "${SAVE:-}" ] && ARGS+=(--save "$SAVE" --save-interval "${SAVE_INTERVAL:-10}")
[ -n "${LOAD:-}" ] && ARGS+=(--load "$LOAD")
# shellcheck disable=SC2206
[ -n "${EXTRA_ARGS:-}" ] && ARGS+=(${EXTRA_ARGS})
case "$MODEL" in
  gpt) ENTRY=pretrain_gpt.py ;;
  bert) ENTRY=pretrain_bert.py ;;
  *) echo "error: MODEL must be gpt or bert, got '$MODEL'" >&2; exit 2 ;;
esac
