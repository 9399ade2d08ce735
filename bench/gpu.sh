#!/usr/bin/env bash
# The GPU run, on the GPU machine (no package index there): installs the wheels that scripts/gpu_prepare.sh put
# in gpu-wheels/ (carried beside the checkout) into a work folder, then runs bench/gpu_run.py's plan with that
# machine's own python3 and torch (no venv, no scripts/env.sh). Arguments go to bench/gpu_run.py (--help);
# --out DIR is required, e.g. `bash bench/gpu.sh --out "$OUT"`. It keeps to 7 minutes (--time-limit 420).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec python3 bench/gpu_run.py --wheels gpu-wheels "$@"
