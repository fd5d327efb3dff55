#!/usr/bin/env bash
# The demo pipeline: each landed command adds one step script under demo/steps/, run in name order.
# Every step reads and writes under $DEMO_OUT and prints its results on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
export LCTOOL="${LCTOOL:-$PWD/.venv/bin/lctool}"
export PY="${PY:-$PWD/.venv/bin/python}"
export DEMO_OUT="${DEMO_OUT:-$PWD/demo-out}"
mkdir -p "$DEMO_OUT"
for step in demo/steps/*.sh; do
  echo
  echo "==================== $(basename "$step" .sh) ===================="
  bash "$step"
done
