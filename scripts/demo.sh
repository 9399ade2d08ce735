#!/usr/bin/env bash
# The main job: put the shipped txt2img workflow through a real headless ComfyUI.
#   bash scripts/demo.sh                                   # on a generated stand-in checkpoint
#   bash scripts/demo.sh --checkpoint /path/to/sd_xl_turbo_1.0_fp16.safetensors --prompt "..."
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec "$COMFY_TURBO_PY" scripts/demo.py "$@"
