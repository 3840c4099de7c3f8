#!/usr/bin/env bash
# Install (idempotent) and run the linters and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check src tests benchmarks scripts
python -m pytest -q -p no:cacheprovider "$@"
