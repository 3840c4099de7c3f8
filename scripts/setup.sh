#!/usr/bin/env bash
# Create .venv and install kvcache with its dev extras. CPU build of torch pinned (2.13.0);
# GPU users: install the CUDA build of torch first (see README), then `pip install -e .[dev]`.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
