#!/usr/bin/env bash
# Create ./.venv and install mindformers-st with its test extra from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,hf]"
.venv/bin/python -c "import mindspore, numpy; print('mindspore', mindspore.__version__, 'numpy', numpy.__version__)"
