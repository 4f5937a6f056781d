#!/usr/bin/env bash
# Through MPI: ranks come from the MPI runtime (Open MPI, MPICH/hydra, or mpi4py);
# rank 0's host becomes MASTER_ADDR unless it is set.
#   NPROC=16 HOSTS=node001:8,node002:8 launch_scripts/mpirun_train.sh pipelines/xoron_full.yaml
set -euo pipefail
config=${1:?usage: NPROC=N [HOSTS=h1:n,h2:n] $0 CONFIG.yaml [overrides...]}
shift
hosts=()
[[ -n "${HOSTS:-}" ]] && hosts=(-hosts "$HOSTS")
exec mpiexec -n "${NPROC:-2}" "${hosts[@]}" python -m xoron_dist.train --config "$config" "$@"
