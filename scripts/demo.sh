#!/usr/bin/env bash
# Loopback demo: Daedalus + Icarus on this machine with a tiny random FLUX.2.
#   bash scripts/demo.sh            (uses $COMFYUI_PATH, else clones a pinned ComfyUI)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
COMFYUI_TAG=${COMFYUI_TAG:-v0.28.0}
VENV=${MESH_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
if [ -z "${COMFYUI_PATH:-}" ]; then
  COMFYUI_PATH="$PWD/.vendor/ComfyUI"
  if [ ! -f "$COMFYUI_PATH/comfy/sd.py" ]; then
    if ! command -v git >/dev/null; then
      echo "demo: needs ComfyUI: set COMFYUI_PATH to a ComfyUI checkout, or install git so this script can clone $COMFYUI_TAG" >&2
      exit 2
    fi
    echo "demo: cloning ComfyUI $COMFYUI_TAG into $COMFYUI_PATH"
    if ! git clone -q --depth 1 --branch "$COMFYUI_TAG" https://github.com/Comfy-Org/ComfyUI "$COMFYUI_PATH"; then
      echo "demo: could not clone ComfyUI (no internet?). Set COMFYUI_PATH to an existing ComfyUI checkout ($COMFYUI_TAG or newer)." >&2
      exit 2
    fi
  fi
fi
export COMFYUI_PATH
# shellcheck source=_common.sh source-path=SCRIPTDIR
. "$HERE/_common.sh"
# ComfyUI needs torchvision and torchaudio next to torch (the CPU build where there is no NVIDIA driver).
python -c "import torch, torchvision, torchaudio" 2>/dev/null || install_torch python -q torch torchvision torchaudio
comfy_requirements python "$COMFYUI_PATH"
python -m pip install -q -e ".[codecs]"
exec python -m comfyui_mesh.demo --comfyui "$COMFYUI_PATH" "$@"
