#!/usr/bin/env bash
# The GPU check of issue 18, one command, at most 9.5 minutes on one H200 (bench/gpu_check.py says what it
# runs): full-size backbone fwd+bwd in bf16 beside a Megatron-core GPTModel (MFU, tokens/s, peak memory),
# the attention-kernel adapter on CUDA against SDPA, the real-CUDA kernel tests and the bf16 lane, the
# multimodal smoke run on the GPU, train.compile eager vs compiled, one MoE layer beside DeepSpeed's, host
# syncs per step as CUDA counts them, and the LM head + loss at several train.loss_chunk_tokens.
# Each part is time-boxed; a failed part is recorded, not fatal.
# Writes bench/out/gpu_check.json (also after every part, so a hard stop keeps what was measured).
#
#   bash bench/gpu_check.sh            # PYTHON=/path/to/python to choose the interpreter
#   python -m bench.gpu_check --rehearse   # no GPU: every part on the CPU at a tiny size, before a GPU session
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "bench/gpu_check.sh: no CUDA GPU visible to torch ($PY); this check runs on a GPU machine" \
       "(\`$PY -m bench.gpu_check --rehearse\` runs its parts on the CPU at a tiny size)" >&2
  exit 2
fi
"$PY" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
exec timeout 570 "$PY" -m bench.gpu_check "$@"
