#!/usr/bin/env bash
# The live benchmark: three live loops through a real server, side by side in one run (Turbo Live's server
# loop, its previous browser-driven loop, stock ComfyUI's best equivalent). Provisions the cached
# environment if needed; arguments go to bench/live_bench.py (--help).
# Results land in bench/results/live/ and docs/live.md's figures are re-rendered from them (with --out
# elsewhere, the page is left alone); bash bench/live.sh --page docs/live.md re-renders only, no new run.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$COMFY_TURBO_PY" bench/live_bench.py "$@"
