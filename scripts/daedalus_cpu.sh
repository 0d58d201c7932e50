#!/usr/bin/env bash
# Daedalus on the CPU (no GPU needed; slow, for trying the setup). Settings as in daedalus.sh.
set -euo pipefail
# shellcheck source=_common.sh source-path=SCRIPTDIR
. "$(dirname "$0")/_common.sh"
setenv CUDA_VISIBLE_DEVICES ""
MESH_DEVICE=cpu exec bash "$(dirname "$0")/daedalus.sh" "$@"
