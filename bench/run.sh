#!/usr/bin/env bash
# The benchmark command: stock ComfyUI and comfy-turbo side by side, in one process, through ComfyUI's
# executor. Provisions the cached environment if needed; arguments go to bench/run.py (--help).
# Results land in bench/results/; after a run, the figures in docs/performance.md are re-rendered from
# every results file there (bench/report.py --page docs/performance.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
"$COMFY_TURBO_PY" bench/run.py "$@"
"$COMFY_TURBO_PY" bench/report.py --page docs/performance.md
