# shellcheck shell=bash
# Shared by the launchers and the installer: paths, the venv's python, dry run.
# Sourced, never run. Settings come from the environment (all optional):
#   MESH_VENV      virtual environment (default: .venv in this checkout)
#   COMFYUI_PATH   ComfyUI checkout (default: what install.sh recorded, else the ComfyUI this
#                  pack sits in as a custom node, else .vendor/ComfyUI)
#   COMFYUI_TAG    ComfyUI release install.sh/update.sh pin (default v0.28.0)
#   MESH_DRY_RUN=1 print every command instead of running it
MESH_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
MESH_VENV=${MESH_VENV:-$MESH_REPO/.venv}
COMFYUI_TAG=${COMFYUI_TAG:-v0.28.0}
MESH_COMFYUI_URL=${MESH_COMFYUI_URL:-https://github.com/Comfy-Org/ComfyUI}

say() { echo "[mesh] $*"; }
die() {
  echo "[mesh] error: $*" >&2
  exit 2
}
dry() { [ "${MESH_DRY_RUN:-0}" = 1 ]; }

# run CMD...: run it, or print it (shell-quoted, after '+ ') in a dry run.
run() {
  if dry; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}

# run_exec CMD...: replace this shell with CMD (a dry run prints it and exits 0).
run_exec() {
  if dry; then
    run "$@"
    exit 0
  fi
  exec "$@"
}

# setenv NAME VALUE: export, and show it in a dry run.
setenv() {
  export "$1=$2"
  if dry; then printf '+ export %s=%q\n' "$1" "$2"; fi
}

# The venv's python; dies with the fix when install.sh has not run (a dry run only names it).
mesh_python() {
  local py="$MESH_VENV/bin/python"
  if [ -x "$py" ] || dry; then
    echo "$py"
  else
    die "no virtual environment at $MESH_VENV: run scripts/install.sh first (or set MESH_VENV)"
  fi
}

is_comfyui() { [ -n "$1" ] && [ -f "$1/comfy/sd.py" ] && [ -f "$1/main.py" ]; }

# Where ComfyUI is: $COMFYUI_PATH, what install.sh recorded, the ComfyUI around this pack, .vendor/ComfyUI.
mesh_comfyui() {
  local recorded=""
  [ -f "$MESH_VENV/comfyui-path.txt" ] && recorded=$(cat "$MESH_VENV/comfyui-path.txt")
  local c
  for c in "${COMFYUI_PATH:-}" "$recorded" "$MESH_REPO/../.." "$MESH_REPO/.vendor/ComfyUI"; do
    if is_comfyui "$c"; then
      (cd "$c" && pwd)
      return 0
    fi
  done
  echo ""
}

# Default device: the first GPU when an NVIDIA driver is present, else the CPU.
mesh_default_device() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then echo cuda:0; else echo cpu; fi
}

# comfy_requirements PYTHON COMFY: install ComfyUI's requirements.txt, keeping the torch build
# already installed (its CUDA variant was chosen for this machine).
comfy_requirements() {
  local reqs="$MESH_VENV/comfyui-requirements.txt"
  if dry; then
    echo "+ grep -vE '^(torch|torchvision|torchaudio)([<>=~ ]|\$)' $2/requirements.txt > $reqs"
  else
    grep -vE '^(torch|torchvision|torchaudio)([<>=~ ]|$)' "$2/requirements.txt" >"$reqs"
  fi
  run "$1" -m pip install -r "$reqs"
}

# The torch build for this machine: MESH_TORCH (cuda|cpu), else cuda with an NVIDIA driver, else cpu.
mesh_torch_build() {
  if [ -n "${MESH_TORCH:-}" ]; then
    echo "$MESH_TORCH"
  elif [ "$(mesh_default_device)" = cpu ]; then echo cpu; else echo cuda; fi
}

# The wheel index for that build: MESH_TORCH_INDEX, else PyTorch's CPU index for a CPU build on Linux
# (there the default wheel is the multi-GB CUDA build), else "" (the default index).
mesh_torch_index() {
  if [ -n "${MESH_TORCH_INDEX:-}" ]; then
    echo "$MESH_TORCH_INDEX"
  elif [ "$(mesh_torch_build)" = cpu ] && [ "$(uname -s)" = Linux ]; then
    echo https://download.pytorch.org/whl/cpu
  fi
}

# install_torch PYTHON PACKAGE...: pip-install torch (and friends) from this machine's index.
install_torch() {
  local py=$1 index
  shift
  index=$(mesh_torch_index)
  if [ -n "$index" ]; then
    run "$py" -m pip install "$@" --index-url "$index"
  else
    run "$py" -m pip install "$@"
  fi
}

