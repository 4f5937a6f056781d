#!/usr/bin/env bash
# Several nodes listed in a DeepSpeed hostfile (see hostfile.example); run on the first node.
#   HOSTFILE=launch_scripts/hostfile launch_scripts/multi_node_hostfile.sh pipelines/xoron_full.yaml
# NCCL settings that commonly matter on InfiniBand clusters can be exported here and are
# forwarded by DeepSpeed through .deepspeed_env (one VAR=value per line in the repo root).
set -euo pipefail
config=${1:?usage: HOSTFILE=FILE $0 CONFIG.yaml [overrides...]}
shift
hostfile=${HOSTFILE:-launch_scripts/hostfile}
master=$(grep -v '^\s*#' "$hostfile" | awk 'NF {print $1; exit}')
exec deepspeed --hostfile "$hostfile" --master_addr "${MASTER_ADDR:-$master}" \
    --master_port "${MASTER_PORT:-29500}" --module xoron_dist.train --config "$config" "$@"
