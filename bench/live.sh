#!/usr/bin/env bash
# The live benchmark: Turbo Live against stock ComfyUI's best equivalent, through a real server, in one
# run. Provisions the cached environment if needed; arguments go to bench/live_bench.py (--help).
# Results land in bench/results/live/; then bash bench/live.sh --page docs/live.md writes them into the
# Live page (re-rendering only, no new run).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$COMFY_TURBO_PY" bench/live_bench.py "$@"
