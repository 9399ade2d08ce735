#!/usr/bin/env bash
# The benchmark command: stock ComfyUI and comfy-turbo side by side, in one process, through ComfyUI's
# executor. Provisions the cached environment if needed; arguments go to bench/run.py (--help).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$COMFY_TURBO_PY" bench/run.py "$@"
