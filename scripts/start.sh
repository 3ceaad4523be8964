#!/usr/bin/env bash
# Install D3PO Studio and open it on the embedded model: http://127.0.0.1:7860
# Extra arguments go to the studio, e.g. --model PATH|HUB_ID --session DIR --port N.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
bash scripts/install.sh
exec "$PY" -m studio "$@"
