#!/usr/bin/env bash
# Install D3PO Studio with its test tools, then lint and run the whole test suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
bash scripts/install.sh test
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m pytest -q "$@"
