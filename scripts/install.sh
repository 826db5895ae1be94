#!/usr/bin/env bash
# Create .venv (if absent) with what `sdrt demo` needs: sdrt with its export extras, the CPU
# ONNX Runtime and a CPU build of PyTorch. `--test` adds what the tests need (scripts/test.sh
# passes it): the dev extras, the TensorRT stubs and Triton's own venv, .venv-triton.
# On a GPU machine install `sdrt[export,cuda13]` or `sdrt[export,cuda12]` (and
# `sdrt[tensorrt-cu13]` or `sdrt[tensorrt-cu12]`) instead; see README's install table.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    "" | --test) ;;
    *) echo "usage: scripts/install.sh [--test]" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# A plain `torch` requirement would pull a multi-GB CUDA build; pin the CPU one first.
python -m pip install -q "torch==2.13.0"
if [ "${1:-}" != "--test" ]; then
    python -m pip install -q -e ".[export,cpu]"
    exit 0
fi
python -m pip install -q -e ".[dev]"
# The stubs pin the `tensorrt` stub package, whose install downloads from NVIDIA: skip deps.
python -m pip install -q --no-deps "tensorrt-stubs==10.13.0.35.1"
# Triton Inference Server for the Triton tests and benchmark (CPU), in its own venv
# .venv-triton: nvidia-pytriton ships the `tritonserver` binary and its python backend, whose
# stub (built against numpy 1) needs numpy<2. The venv doubles as the model's execution
# environment (EXECUTION_ENV_PATH): the runtime's wheels, numpy<2 and sdrt itself (editable).
# pytriton's own Python dependencies are skipped: only its binary is used. Skipped when present.
PY_VERSION=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
TRITON_HOME=".venv-triton/lib/python$PY_VERSION/site-packages/pytriton/tritonserver"
if [ ! -x "$TRITON_HOME/backends/python/triton_python_backend_stub" ]; then
    rm -rf .venv-triton
    python -m venv .venv-triton
    .venv-triton/bin/python -m pip install -q "numpy<2" onnxruntime tokenizers pillow tqdm
    .venv-triton/bin/python -m pip install -q --no-deps -e .
    .venv-triton/bin/python -m pip install -q --no-deps "nvidia-pytriton==0.7.0"
    # The python backend runs each model in a stub process built for one Python version: ours.
    cp "$TRITON_HOME/python_backend_stubs/$PY_VERSION/triton_python_backend_stub" \
        "$TRITON_HOME/backends/python/"
fi
