#!/usr/bin/env bash
# Watch every run under runs/ (or the directory given). On a cluster, forward the port:
#   ssh -L 6006:localhost:6006 login-node   then open http://localhost:6006
set -euo pipefail
exec tensorboard --logdir "${1:-runs}" --port "${PORT:-6006}" --bind_all
