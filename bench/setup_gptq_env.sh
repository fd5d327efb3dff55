#!/usr/bin/env bash
# Side environment for the GPTQModel interop test and the quantize benchmark's comparison run:
# GPTQModel 7.6.0 (the last release that accepts torch 2.13) + optimum, beside the main venv so its
# numpy/torchao pins never touch lctool's own environment. Idempotent; ~5-10 min the first time.
#   bash bench/setup_gptq_env.sh            -> /work/main/.venv-gptq (or $GPTQ_VENV)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GPTQ_VENV:-$PWD/.venv-gptq}"
STAMP="$VENV/.installed"
export PIP_CONSTRAINT="$PWD/constraints.txt"
if [ -f "$STAMP" ]; then echo "$VENV ready"; exit 0; fi
test -x "$VENV/bin/python" || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip setuptools wheel
"$VENV/bin/pip" install -q torch==2.13.0
# gptqmodel builds from source and its build imports torch: no build isolation.
"$VENV/bin/pip" install -q --no-build-isolation "gptqmodel==7.6.0" "optimum==2.3.0" "transformers==$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')"
"$VENV/bin/python" -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed'; import gptqmodel, optimum; print('gptqmodel', gptqmodel.__version__, 'torch', torch.__version__)"
touch "$STAMP"
