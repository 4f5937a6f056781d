#!/usr/bin/env bash
# The packages a lent GPU machine lacks, as wheels for its Python (3.12, manylinux x86_64), into .whl/ (ignored
# by git): run it here, where pip reaches the registry, before asking for the machine; the device call carries
# .whl and installs it (bench/gpu_session.sh). The image's own torch (a CUDA build), numpy, pyarrow,
# tensorboard, mpi4py, transformers, tokenizers, safetensors, pillow and tqdm are used as they are
# (KINDS.md in the device tool's library lists the image); what is fetched here is the rest of pyproject's
# dependencies and their own: DeepSpeed (built here into a wheel without its ops, DS_BUILD_OPS=0: the
# optimizer falls back when FusedAdam cannot build), megatron-core, webdataset, soundfile, av.
#
#   bash bench/gpu_wheels.sh          # about 15 s; .whl/ holds about 45 MB
#   PYVER=3.13 bash bench/gpu_wheels.sh   # for an image with another Python (gpu_session.sh checks)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=.whl
PYVER=${PYVER:-3.12}
rm -rf "$OUT" && mkdir -p "$OUT"
# pyproject's dependencies the image lacks and their own, at the versions installed here (what the suite runs)
NAMES=(megatron-core webdataset braceexpand hjson pydantic pydantic-core annotated-types typing-inspection
       soundfile cffi pycparser av deepspeed)
mapfile -t PINS < <("$PY" -c 'import sys, importlib.metadata as m; [print(f"{n}=={m.version(n)}") for n in sys.argv[1:]]' \
                    "${NAMES[@]}")
WHEELS=("${PINS[@]:0:${#PINS[@]}-1}")
DEEPSPEED=${PINS[-1]}
PLATFORMS=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}" \
  -d "$OUT" "${WHEELS[@]}"
# DeepSpeed publishes a source distribution only: a wheel of its Python code, its ops left to JIT (not used)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$DEEPSPEED"
echo "$PYVER" > "$OUT/PYTHON_VERSION"  # gpu_session.sh refuses another Python before installing
ls "$OUT"
du -sh "$OUT"
