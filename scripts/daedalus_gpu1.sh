#!/usr/bin/env bash
# Daedalus pinned to GPU 1 (same-host pair: ComfyUI on GPU 0, start it with --cuda-device 0).
# The GPU is renumbered cuda:0 inside this process. Settings as in daedalus.sh.
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
. "$(dirname "$0")/_common.sh"
setenv CUDA_VISIBLE_DEVICES 1
MESH_DEVICE=cuda:0 exec bash "$(dirname "$0")/daedalus.sh" "$@"
