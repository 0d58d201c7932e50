#!/usr/bin/env bash
# Install (or repair) everything Daedalus needs, then check it. Safe to run again.
#   bash scripts/install.sh
# Steps: virtualenv (MESH_VENV, default .venv) -> torch (CUDA build with an NVIDIA driver, else CPU;
# kept if already installed) -> ComfyUI (COMFYUI_PATH, or the ComfyUI this pack sits in, or a clone
# of release $COMFYUI_TAG into .vendor/ComfyUI) -> ComfyUI's requirements -> this package
# (pip install -e) -> python -m comfyui_mesh.server.check.
# Options (environment): PYTHON (python3), MESH_TORCH=cpu|cuda, MESH_TORCH_INDEX (a wheel index URL),
# MESH_DRY_RUN=1 (print the commands instead of running them).
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
. "$(dirname "$0")/_common.sh"
BASE_PY=${PYTHON:-python3}

say "1/6 virtual environment: $MESH_VENV"
if [ -x "$MESH_VENV/bin/python" ]; then
  say "    exists, kept"
else
  command -v "$BASE_PY" >/dev/null || dry || die "$BASE_PY not found: install Python 3.10+ (or set PYTHON)"
  run "$BASE_PY" -m venv "$MESH_VENV"
fi
PY=$(mesh_python)
run "$PY" -m pip install --upgrade pip wheel

say "2/6 torch"
if [ -x "$PY" ] && "$PY" -c "import torch" >/dev/null 2>&1 && [ -z "${MESH_TORCH:-}${MESH_TORCH_INDEX:-}" ]; then
  say "    kept: $("$PY" -c 'import torch; print(torch.__version__)')"
else
  say "    installing the $(mesh_torch_build) build"
  install_torch "$PY" torch torchvision torchaudio
fi

say "3/6 ComfyUI"
COMFY=$(mesh_comfyui)
if [ -n "$COMFY" ]; then
  say "    using $COMFY"
else
  COMFY="$MESH_REPO/.vendor/ComfyUI"
  command -v git >/dev/null || dry || die "git not found: install git, or set COMFYUI_PATH to an existing ComfyUI"
  say "    cloning ComfyUI $COMFYUI_TAG into $COMFY"
  run git clone --depth 1 --branch "$COMFYUI_TAG" "$MESH_COMFYUI_URL" "$COMFY"
fi

say "4/6 ComfyUI's requirements (torch kept as installed)"
comfy_requirements "$PY" "$COMFY"

say "5/6 ComfyUI-Mesh (editable) and its codecs"
run "$PY" -m pip install -e "${MESH_REPO}[codecs]"
if dry; then echo "+ echo $COMFY > $MESH_VENV/comfyui-path.txt"; else echo "$COMFY" >"$MESH_VENV/comfyui-path.txt"; fi

say "6/6 install check"
run "$PY" -m comfyui_mesh.server.check --comfyui "$COMFY"
say "done. Start the server: scripts/daedalus_gui.sh (window) or MESH_WEIGHTS=<model> scripts/daedalus.sh"
