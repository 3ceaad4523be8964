#!/usr/bin/env bash
# Install D3PO Studio into the current Python environment (a venv is recommended).
# Keeps the torch you already have (CUDA or CPU); installs torch 2.13.0 only when none is found.
# Usage: bash scripts/install.sh [extra]   e.g. "test" for the test tools
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "no torch found: installing torch==2.13.0 (for a CPU-only build see README)"
  "$PY" -m pip install "torch==2.13.0"
fi
target="."
if [ -n "${1:-}" ]; then target=".[$1]"; fi
"$PY" -m pip install -e "$target"
