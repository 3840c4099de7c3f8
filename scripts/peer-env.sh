#!/usr/bin/env bash
# Make a side environment for what cannot share kvcache's venv because of its pins. torch is pinned to the CPU
# build first in each: an unpinned `torch` would pull a multi-GB CUDA build.
#
#   bash scripts/peer-env.sh kvpress [DIR]        # -> .peer-envs/kvpress (what `kvcache bench --peers kvpress` uses)
#   bash scripts/peer-env.sh transformers4 [DIR]  # -> /tmp/kvcache-transformers4 (ONNX fixtures of older releases)
#
# kvpress: kvpress 0.5.5 pins transformers < 5.3 while kvcache needs >= 5.3; the bench drives it as a
# subprocess (src/kvcache/bench/kvpress_runner.py, which imports only torch, transformers and kvpress) on the
# same prompts (then pass --kvpress-python DIR/bin/python for a DIR of your own).
# transformers4: an older transformers release (4.4x, KVCACHE_OLD_TRANSFORMERS, default 4.46.3) for the ONNX
# fixtures exported the way older releases export; kvcache itself is not installed there: the fixture script
# (scripts/make_onnx_fixtures.py --old-python) runs scripts/export_plain.py in it as a subprocess.
set -euo pipefail
cd "$(dirname "$0")/.."
peer="${1:-}"
make_venv() {
    if [ ! -x "$1/bin/python" ]; then
        python3 -m venv "$1"
    fi
    "$1/bin/python" -m pip install -q --upgrade pip
    "$1/bin/python" -m pip install -q "torch==2.13.0"
}
case "$peer" in
    kvpress)
        dir="${2:-.peer-envs/kvpress}"
        make_venv "$dir"
        "$dir/bin/python" -m pip install -q "kvpress==0.5.5" "transformers>=4.56,<5.3"
        "$dir/bin/python" -c "import kvpress, transformers, torch; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', 'transformers', transformers.__version__, 'torch', torch.__version__)"
        echo "ready: $dir/bin/python"
        ;;
    transformers4)
        dir="${2:-/tmp/kvcache-transformers4}"
        make_venv "$dir"
        "$dir/bin/python" -m pip install -q "transformers==${KVCACHE_OLD_TRANSFORMERS:-4.46.3}" \
            "onnx>=1.17,<2" "onnxruntime>=1.20,<2"
        "$dir/bin/python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
        echo "ready: $dir/bin/python"
        ;;
    *)
        echo "usage: bash scripts/peer-env.sh kvpress|transformers4 [DIR]" >&2
        exit 2
        ;;
esac
