#!/usr/bin/env bash
# On a lent GPU machine (the device tool's `run`, with carry [".whl"]): install the wheels bench/gpu_wheels.sh
# made into /tmp/site, beside the image's own torch, then run the GPU check (bench/gpu_check.sh, at most 570 s)
# and copy its report to $OUT, which the device tool brings back. Arguments go to the check
# (e.g. --parts compile,head to rerun some parts).
#
#   run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! ls .whl/*.whl > /dev/null 2>&1; then
  echo "bench/gpu_session.sh: no wheels in .whl/: run bash bench/gpu_wheels.sh here first and carry .whl" >&2
  exit 2
fi
want=$(cat .whl/PYTHON_VERSION 2>/dev/null || echo 3.12)
have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [ "$want" != "$have" ]; then
  echo "bench/gpu_session.sh: the wheels in .whl/ are for Python $want, $PY here is $have:" \
       "run PYVER=$have bash bench/gpu_wheels.sh and carry .whl again" >&2
  exit 2
fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
status=0
PYTHON=$PY bash bench/gpu_check.sh "$@" || status=$?
if [ -n "${OUT:-}" ] && [ -f bench/out/gpu_check.json ]; then
  cp bench/out/gpu_check.json "$OUT/"
  if [ -d bench/out/gpu_check_profile ]; then  # the smoke part's step profile (trace and op summary)
    cp -r bench/out/gpu_check_profile "$OUT/"
  fi
fi
exit "$status"
