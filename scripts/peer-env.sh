#!/usr/bin/env bash
# Make the side environment a benchmark peer runs in, when its pins exclude kvcache's own dependencies.
#
#   bash scripts/peer-env.sh kvpress            # -> .peer-envs/kvpress (what `kvcache bench --peers kvpress` uses)
#   bash scripts/peer-env.sh kvpress DIR        # -> DIR (then pass --kvpress-python DIR/bin/python)
#
# kvpress 0.5.5 pins transformers < 5.3 while kvcache needs >= 5.3, so it cannot share kvcache's venv. The
# bench drives it as a subprocess (src/kvcache/bench/kvpress_runner.py, which imports only torch,
# transformers and kvpress) on the same prompts. torch is pinned to the CPU build first: an unpinned `torch`
# would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
peer="${1:-}"
case "$peer" in
    kvpress)
        dir="${2:-.peer-envs/kvpress}"
        if [ ! -x "$dir/bin/python" ]; then
            python3 -m venv "$dir"
        fi
        "$dir/bin/python" -m pip install -q --upgrade pip
        "$dir/bin/python" -m pip install -q "torch==2.13.0"
        "$dir/bin/python" -m pip install -q "kvpress==0.5.5" "transformers>=4.56,<5.3"
        "$dir/bin/python" -c "import kvpress, transformers, torch; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', 'transformers', transformers.__version__, 'torch', torch.__version__)"
        echo "ready: $dir/bin/python"
        ;;
    *)
        echo "usage: bash scripts/peer-env.sh kvpress [DIR]" >&2
        exit 2
        ;;
esac
