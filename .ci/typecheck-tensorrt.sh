#!/usr/bin/env bash
# Type-check the TensorRT backend, engine cache and engine builder against the TensorRT stubs.
#
# Needs, in the active Python environment (no GPU, no TensorRT runtime):
#   pip install mypy numpy
#   pip install --no-deps tensorrt-stubs==10.13.0.35.1
# cuda-python ships no type information, so the code reaches cuda.bindings through importlib and
# it needs no install here.
#
# Why the staging below: tensorrt-stubs 10.13.0.35.1 has no py.typed marker (mypy skips it as it
# is installed), contains a few lines that are not valid Python (a parameter named `in`, a
# parameter without a default after defaulted ones), imports a module it does not ship
# (tensorrt_libs), and defines a module-level `bool` that shadows the builtin in every `-> bool`
# annotation. We copy the stubs, patch those lines in the copy, and silence the remaining errors
# inside the stubs themselves; our own files are checked with --strict and must have none.
# sdrt's editable install maps runtime/ onto `sdrt` through an import hook mypy cannot follow, so
# the sources are copied into an `sdrt` tree too.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
FILES=(runtime/backends/tensorrt.py runtime/engine_cache.py export/tensorrt_build.py)
MODULES=(sdrt.backends.tensorrt sdrt.engine_cache sdrt.export.tensorrt_build)

site=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ ! -f "$site/tensorrt/__init__.pyi" ] || [ ! -f "$site/tensorrt_bindings/tensorrt.pyi" ]; then
    echo "typecheck-tensorrt: tensorrt-stubs missing; run: $PYTHON -m pip install --no-deps tensorrt-stubs==10.13.0.35.1" >&2
    exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/stubs" "$work/src"
cp -r "$site/tensorrt" "$site/tensorrt_bindings" "$work/stubs/"
touch "$work/stubs/tensorrt_libs.pyi"
sed -i -E \
    -e 's/([(, ])in: /\1in_: /g' \
    -e 's/(power: Weights = None, channel_axis: int)\)/\1 = ...)/' \
    -e 's/^bool: /bool_: /' \
    "$work/stubs/tensorrt_bindings/tensorrt.pyi" "$work/stubs/tensorrt/__init__.pyi" \
    "$work/stubs/tensorrt_bindings/__init__.pyi"

cp -r runtime "$work/src/sdrt"
cp -r export "$work/src/sdrt/export"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +

cat > "$work/mypy.ini" <<'INI'
[mypy]
[mypy-tensorrt.*,tensorrt_bindings.*,tensorrt_libs]
ignore_errors = True
INI

args=()
for m in "${MODULES[@]}"; do args+=(-m "$m"); done
set +e
MYPYPATH="$work/stubs:$work/src" "$PYTHON" -m mypy \
    --config-file "$work/mypy.ini" \
    --strict --follow-imports=silent --python-version 3.10 \
    --no-incremental --cache-dir=/dev/null --show-error-codes \
    "${args[@]}" 2>&1 | sed -e "s#$work/src/sdrt/export/#export/#g" -e "s#$work/src/sdrt/#runtime/#g"
status=${PIPESTATUS[0]}
set -e
echo "typecheck-tensorrt: checked ${FILES[*]}"
exit "$status"
