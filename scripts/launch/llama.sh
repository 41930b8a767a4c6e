#!/usr/bin/env bash
# A small Llama-shaped model (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied output layer, no
# biases) trained with pretrain_gpt.py on one node, NPROC processes (GPUs, or CPU processes on gloo).
#   bash scripts/launch/llama.sh                    # tiny model on synthetic data, 2 processes, TP 2
#   DATA_PATH=data/corpus_text_document TOKENIZER_MODEL=tok/llama.model NPROC=8 TP=2 \
#     NUM_LAYERS=16 HIDDEN=2048 HEADS=16 QUERY_GROUPS=4 FFN=5632 SEQ=2048 MBS=4 GBS=512 ITERS=100000 \
#     EXTRA_ARGS=--bf16 bash scripts/launch/llama.sh
# TOKENIZER_MODEL: a SentencePiece .model (Llama2Tokenizer: <s> prepended, </s> ends each document) or a
# tokenizer.json / its folder (HuggingFaceTokenizer); or VOCAB_FILE and MERGE_FILE of a GPT-2 BPE
# (GPT2BPETokenizer, as scripts/quickstart.sh trains one). Preprocess with the same tokenizer and --append-eod.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SEQ="${SEQ:-64}"
ARGS=(
  --tensor-model-parallel-size "${TP:-2}"
  --num-layers "${NUM_LAYERS:-2}" --hidden-size "${HIDDEN:-64}" --num-attention-heads "${HEADS:-4}"
  --group-query-attention --num-query-groups "${QUERY_GROUPS:-2}" --ffn-hidden-size "${FFN:-176}"
  --position-embedding-type rope --rotary-base "${ROTARY_BASE:-10000}"
  --normalization RMSNorm --norm-epsilon 1e-5 --swiglu
  --untie-embeddings-and-output-weights --disable-bias-linear
  --hidden-dropout 0 --attention-dropout 0
  --seq-length "$SEQ" --max-position-embeddings "$SEQ"
  --micro-batch-size "${MBS:-4}" --global-batch-size "${GBS:-8}"
  --train-iters "${ITERS:-20}" --lr "${LR:-3e-3}" --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2
  --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --init-method-std 0.02
  --log-interval "${LOG_INTERVAL:-5}" --eval-interval "${EVAL_INTERVAL:-10}" --eval-iters "${EVAL_ITERS:-2}"
  --split 949,50,1
)
if [ -n "${DATA_PATH:-}" ]; then
  # shellcheck disable=SC2206
  ARGS+=(--data-path ${DATA_PATH})
else
  ARGS+=(--mock-data)
fi
if [ -n "${MERGE_FILE:-}" ]; then
  ARGS+=(--tokenizer-type GPT2BPETokenizer --vocab-file "${VOCAB_FILE:?MERGE_FILE needs VOCAB_FILE}" --merge-file "$MERGE_FILE")
elif [ -z "${TOKENIZER_MODEL:-}" ]; then
  ARGS+=(--tokenizer-type NullTokenizer --vocab-size "${VOCAB_SIZE:-1024}")
elif [[ "$TOKENIZER_MODEL" == *.model ]]; then
  ARGS+=(--tokenizer-type Llama2Tokenizer --tokenizer-model "$TOKENIZER_MODEL")
else
  ARGS+=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
fi
[ -n "${SAVE:-}" ] && ARGS+=(--save "$SAVE" --save-interval "${SAVE_INTERVAL:-10}")
[ -n "${LOAD:-}" ] && ARGS+=(--load "$LOAD")
# shellcheck disable=SC2206
[ -n "${EXTRA_ARGS:-}" ] && ARGS+=(${EXTRA_ARGS})
cd "$ROOT"
exec torchrun --standalone --nnodes 1 --nproc_per_node "${NPROC:-2}" pretrain_gpt.py "${ARGS[@]}"
