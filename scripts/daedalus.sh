#!/usr/bin/env bash
# Daedalus, headless: serve the back half of a model to Icarus nodes.
#   MESH_WEIGHTS=/models/flux-2-klein-9b-fp8.safetensors scripts/daedalus.sh [more server flags]
# Settings (environment, all optional but MESH_WEIGHTS):
#   MESH_N_BLOCKS (4)  MESH_PORT (7777)  MESH_BIND (127.0.0.1; 0.0.0.0 to serve another PC)
#   MESH_DEVICE (cuda:0 with an NVIDIA GPU, else cpu)  MESH_DTYPE (auto)
# Extra arguments go to `python -m comfyui_mesh.server` (--help lists them). MESH_DRY_RUN=1 prints the command.
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
. "$(dirname "$0")/_common.sh"
PY=$(mesh_python)
COMFY=$(mesh_comfyui)
[ -n "$COMFY" ] || dry || die "ComfyUI not found: run scripts/install.sh, or set COMFYUI_PATH"
setenv COMFYUI_PATH "$COMFY"
args=(-m comfyui_mesh.server
  --n-blocks "${MESH_N_BLOCKS:-4}" --port "${MESH_PORT:-7777}" --bind "${MESH_BIND:-127.0.0.1}"
  --device "${MESH_DEVICE:-$(mesh_default_device)}" --dtype "${MESH_DTYPE:-auto}" --comfyui "$COMFY")
if [ -n "${MESH_WEIGHTS:-}" ]; then
  args+=(--weights "$MESH_WEIGHTS")
fi
run_exec "$PY" "${args[@]}" "$@"
