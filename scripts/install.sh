#!/usr/bin/env bash
# Create .venv (if absent) with sdrt, its export/bench/dev extras and a CPU build of PyTorch.
# On a GPU machine install `sdrt[export,cuda13]` or `sdrt[export,cuda12]` (and
# `sdrt[tensorrt-cu13]` or `sdrt[tensorrt-cu12]`) instead; see README's install table.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# A plain `torch` requirement would pull a multi-GB CUDA build; pin the CPU one first.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# The stubs pin the `tensorrt` stub package, whose install downloads from NVIDIA: skip deps.
python -m pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1"
