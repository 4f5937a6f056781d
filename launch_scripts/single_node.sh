#!/usr/bin/env bash
# One machine, N GPUs (or N CPU ranks), through the DeepSpeed launcher.
#   NPROC=8 launch_scripts/single_node.sh pipelines/smoke.yaml [key.sub=value ...] [--resume]
set -euo pipefail
config=${1:?usage: NPROC=N $0 CONFIG.yaml [overrides...]}
shift
exec deepspeed --num_gpus "${NPROC:-1}" --master_port "${MASTER_PORT:-29500}" \
    --module xoron_dist.train --config "$config" "$@"
