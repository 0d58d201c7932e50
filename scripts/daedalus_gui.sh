#!/usr/bin/env bash
# The Daedalus window: choose the model, n_blocks, device..., Start. Pin a GPU for a same-host
# pair with CUDA_VISIBLE_DEVICES=1 scripts/daedalus_gui.sh. Extra arguments go to the window
# (--toy: a model-free test server). MESH_DRY_RUN=1 prints the command.
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
. "$(dirname "$0")/_common.sh"
PY=$(mesh_python)
COMFY=$(mesh_comfyui)
if [ -n "$COMFY" ]; then setenv COMFYUI_PATH "$COMFY"; fi
run_exec "$PY" -m comfyui_mesh.server.gui "$@"
