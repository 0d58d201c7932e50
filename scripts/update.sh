#!/usr/bin/env bash
# Update: this checkout (git pull), the pinned ComfyUI release (only a ComfyUI that install.sh
# cloned into .vendor/ComfyUI; yours is left alone), the requirements, then the install check.
#   bash scripts/update.sh            COMFYUI_TAG=v0.29.0 bash scripts/update.sh
# MESH_DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
. "$(dirname "$0")/_common.sh"
PY=$(mesh_python)
if [ -d "$MESH_REPO/.git" ]; then
  say "updating ComfyUI-Mesh"
  run git -C "$MESH_REPO" pull --ff-only
fi
COMFY=$(mesh_comfyui)
[ -n "$COMFY" ] || dry || die "ComfyUI not found: run scripts/install.sh first"
if [ "$COMFY" = "$MESH_REPO/.vendor/ComfyUI" ] && [ -d "$COMFY/.git" ]; then
  say "moving ComfyUI to $COMFYUI_TAG"
  run git -C "$COMFY" fetch --depth 1 origin tag "$COMFYUI_TAG"
  run git -C "$COMFY" checkout -q "$COMFYUI_TAG"
else
  say "ComfyUI at ${COMFY:-?} is yours: update it your usual way (this pack is tested with $COMFYUI_TAG)"
fi
comfy_requirements "$PY" "$COMFY"
run "$PY" -m pip install -e "${MESH_REPO}[codecs]"
run "$PY" -m comfyui_mesh.server.check --comfyui "$COMFY"
