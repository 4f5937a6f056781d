#!/usr/bin/env bash
# Through torchrun (elastic launcher), one node or several (run it on each node).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node001 NPROC=8 launch_scripts/torchrun_train.sh CONFIG.yaml
set -euo pipefail
config=${1:?usage: NPROC=N [NNODES= NODE_RANK= MASTER_ADDR=] $0 CONFIG.yaml [overrides...]}
shift
exec torchrun --nproc_per_node "${NPROC:-1}" --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m xoron_dist.train --config "$config" "$@"
