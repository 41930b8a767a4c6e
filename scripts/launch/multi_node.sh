#!/usr/bin/env bash
# Several nodes with torchrun: run this same command on every node, with NODE_RANK 0..NNODES-1.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 NPROC=8 TP=8 bash scripts/launch/multi_node.sh gpt   # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 NPROC=8 TP=8 bash scripts/launch/multi_node.sh gpt   # on node1
# 3D parallelism: TP inside a node, pipeline stages across nodes, DP over the rest, e.g. on 4 nodes x 8 GPUs
#   NNODES=4 NODE_RANK=... MASTER_ADDR=node0 NPROC=8 TP=4 PP=4 NUM_LAYERS=48 ... (DP = 32 / (4 x 4) = 2)
# With NNODES=1 (the default) it runs on this machine alone.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MODEL="${1:-gpt}"
source "$ROOT/scripts/launch/model_args.sh"
cd "$ROOT"
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NPROC:-2}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-6000}" "$ENTRY" "${ARGS[@]}"
