#!/usr/bin/env bash
# The test command: provisions the cached environment if needed, then runs pytest against a
# real ComfyUI (COMFYUI_PATH switches to another checkout). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$COMFY_TURBO_PY" -m pytest tests "$@"
