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
ruff check .                 # lint
ruff format --check .        # formatting
mypy                         # type-check the core (files listed in pyproject.toml)
set +e
python -m pytest tests -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
