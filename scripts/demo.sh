#!/usr/bin/env bash
# Install (if needed) and run the main job: `sdrt demo`, or `sdrt ARGS...` when given.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
if [ $# -eq 0 ]; then set -- demo; fi
sdrt "$@"
