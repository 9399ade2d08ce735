#!/usr/bin/env bash
# Prepare a GPU run, here (a package index is reachable): fetch into gpu-wheels/ the wheels the GPU machine
# lacks (bench/gpu/wheels.txt, cp312 manylinux x86-64), check their requirements and the 64 MiB that may travel.
# Then carry gpu-wheels/ beside the checkout and run `bash bench/gpu.sh --out "$OUT"` there.
# Arguments go to scripts/gpu_prepare.py (--help). Any Python 3 with pip will do; without one, the cached
# environment's (scripts/env.sh) is used.
set -euo pipefail
cd "$(dirname "$0")/.."
if python3 -m pip --version >/dev/null 2>&1; then
  py=python3
else
  source scripts/env.sh
  py="$COMFY_TURBO_PY"
fi
exec "$py" scripts/gpu_prepare.py "$@"
