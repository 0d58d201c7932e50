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
# CPU torch is enough for the tests (on this project's machines 2.13.0 comes from local disk).
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
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
mypy                         # type-check the core (files listed in pyproject.toml)
set +e
python -m pytest tests -q --cov=comfyui_mesh --cov-report=term "$@"  # with the coverage table
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
