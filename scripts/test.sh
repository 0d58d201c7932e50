#!/usr/bin/env bash
# Set up a virtualenv (idempotent) and run the whole test suite. CI runs exactly this.
#   bash scripts/test.sh [pytest args]
# Tests that need ComfyUI run when COMFYUI_PATH points at a ComfyUI checkout; else they skip.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MESH_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# The tests need no GPU: without an NVIDIA driver torch comes from PyTorch's CPU index (the default
# Linux wheel is the multi-GB CUDA build; on this project's machines 2.13.0 is a local CPU wheel).
# shellcheck source=_common.sh source-path=SCRIPTDIR
. scripts/_common.sh
python -c "import torch" 2>/dev/null || install_torch python -q "torch==2.13.0"
python -m pip install -q -e ".[codecs,test]"
# System tools the GUI/launcher tests use (a virtual display, clicks, screenshots, shell lint).
# Installed only in CI (CI=true) or on request; elsewhere those tests skip with a reason.
if [ "${CI:-}" = "true" ] || [ "${MESH_TEST_SYSTEM_DEPS:-}" = "1" ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = "0" ]; then
    missing=""
    for pkg in xvfb xdotool imagemagick shellcheck; do
      dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
    done
    if [ -n "$missing" ]; then
      # shellcheck disable=SC2086  # word splitting of the package list is intended
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    fi
  fi
fi
# The browser test (only where COMFYUI_PATH is set) drives Chromium with playwright-core.
if [ -n "${COMFYUI_PATH:-}" ] && [ -f package-lock.json ] && command -v npm >/dev/null; then
  npm ci --silent --no-audit --no-fund
fi
ruff check .                 # lint
ruff format --check .        # formatting
# mypy checks the package by its import name: a folder named ComfyUI-Mesh is not a module name.
mkdir -p .dev/typecheck && ln -sfn ../.. .dev/typecheck/comfyui_mesh
MYPYPATH=.dev/typecheck mypy -p comfyui_mesh   # type-check (settings in pyproject.toml)
set +e
python -m pytest tests -q --cov=comfyui_mesh --cov-report=term "$@"  # with the coverage table
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
