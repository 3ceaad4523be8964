#!/usr/bin/env bash
# Install D3PO Studio, then run three scripted D3PO rounds on the embedded model: each round
# samples 8 grids, picks best/worst by JPEG compressibility, and trains a LoRA round; the table
# shows the objective of the base and the tuned model on a fixed evaluation set, and the win rate.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
bash scripts/install.sh
exec "$PY" -m d3po_core simulate --scorer jpeg_compressibility --rounds 3 --grids 8 \
  --grid-size 4 --prompts examples/prompts.txt --session sessions/demo "$@"
