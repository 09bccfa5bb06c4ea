#!/usr/bin/env bash
# Run the whole test suite (unit tests and the slow msrun tests) with the project's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest -q -ra "$@" tests
