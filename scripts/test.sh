#!/usr/bin/env bash
# Install (if needed) the test environments, then run every check CI runs: lint, the TensorRT
# type check, the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
. .venv/bin/activate
ruff check .
if [ -f .ci/typecheck-tensorrt.sh ]; then bash .ci/typecheck-tensorrt.sh; fi
python -m pytest -q "$@"
