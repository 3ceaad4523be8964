#!/usr/bin/env bash
# Install D3PO Studio with its test tools, then lint and run the whole test suite (CPU only).
# On Debian/Ubuntu run as root (as CI is), it also installs Debian's chromium for the
# end-to-end browser test; elsewhere that test is skipped unless a chromium is on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# torch processes that share cores (the kill tests' workers) should not spin while they wait
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    && [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
bash scripts/install.sh test
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m pytest -q "$@"
