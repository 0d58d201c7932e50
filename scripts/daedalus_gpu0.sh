#!/usr/bin/env bash
# Daedalus pinned to GPU 0 (same-host pair: ComfyUI on GPU 1). Settings as in daedalus.sh.
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
. "$(dirname "$0")/_common.sh"
setenv CUDA_VISIBLE_DEVICES 0
MESH_DEVICE=cuda:0 exec bash "$(dirname "$0")/daedalus.sh" "$@"
