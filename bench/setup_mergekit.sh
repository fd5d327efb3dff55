#!/usr/bin/env bash
# Installs mergekit 0.1.5 into a side environment (.venv-mergekit) for the merge equality tests and
# bench/merge.py. Kept out of .venv so it cannot move torch/transformers; torch stays at the pinned
# CPU build through constraints.txt. Idempotent: a stamp file skips the work on later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${LCTOOL_MERGEKIT_VENV:-$PWD/.venv-mergekit}"
STAMP="$VENV/.installed-mergekit-0.1.5"
[ -f "$STAMP" ] && exit 0
export PIP_CONSTRAINT="$PWD/constraints.txt"
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "mergekit==0.1.5" "transformers>=5,<6"
"$VENV/bin/python" -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed'"
test -x "$VENV/bin/mergekit-yaml"
touch "$STAMP"
echo "mergekit installed in $VENV"
