#!/usr/bin/env bash
# Create a side virtual environment with an older transformers release (4.4x) beside the CPU build of
# torch 2.13.0, for the ONNX fixtures exported the way older releases export (see
# scripts/make_onnx_fixtures.py --old-transformers). kvcache itself is not installed there (it needs
# transformers 5): the fixture script runs its export step in this environment as a subprocess.
#
#   bash scripts/peer-env.sh [VENV_DIR]      # default /tmp/kvcache-transformers4
set -euo pipefail
VENV="${1:-/tmp/kvcache-transformers4}"
TRANSFORMERS="${KVCACHE_OLD_TRANSFORMERS:-4.46.3}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "torch==2.13.0"   # the CPU build; an unpinned torch is the CUDA one
"$VENV/bin/python" -m pip install -q "transformers==$TRANSFORMERS" "onnx>=1.17,<2" "onnxruntime>=1.20,<2"
"$VENV/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
