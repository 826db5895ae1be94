#!/usr/bin/env bash
# The first GPU session as ONE device call of at most 9 minutes, on an H100/H200 with Python 3.12
# and torch 2.11 + CUDA 13, no registry, no diffusers and no onnxruntime-gpu installed. Each
# phase runs under its own `timeout` and its results land under $OUT as it ends, so a call cut
# short still returns what was done (at most 8 files come back).
#
#   here:   bash benchmarks/gpu_session.sh --dry-run   the plan; every command line, the wheel
#                                                      list and the carry size checked offline
#   here:   bash benchmarks/gpu_session.sh pack        wheels -> .devpack/1..N (device-pack)
#   device: bash .devpack/K/recv.sh                    K = 1..N-1, one short run each
#   device: bash benchmarks/gpu_session.sh             the session, carrying .devpack/N
#   here:   bash benchmarks/gpu_session.sh commands    the sdrt command lines, one per line
#   here:   bash benchmarks/gpu_session.sh lora-args   the LoRA benchmark's arguments
#   device: bash benchmarks/gpu_session.sh environment|install|lora   one phase alone
#
# Phases: environment; install (the last wheel piece joins the others and installs into
# /tmp/site, sdrt into /tmp/sdrt, then a torch-free check that the CUDA provider starts);
# `sdrt bench` (SD 1.5 architecture, 512x512, 50 steps: eager diffusers against the ONNX
# Runtime CUDA fast path, exported inside the same process; torch.compile too where the time
# left allows); the run-time LoRA branch's cost (issue 20 item 3: SD 1.5 U-Net exported plain
# and with the branch, R = 32, on ORT CUDA), only with LORA_MIN left (else alone in a later
# call: `lora`); TensorRT, only where `import tensorrt` works.
set -uo pipefail

cd "$(dirname "$0")/.."
SELF=$PWD/benchmarks/gpu_session.sh
OUT=${OUT:-gpu-session-out}
PYTHON=${PYTHON:-python3}
TRT_BUNDLE=/tmp/sdrt-sd15-trt
WHEELS=(onnxruntime-gpu==1.31.1 diffusers==0.42.1 importlib_metadata==10.2.0)
CARRY_LIMIT=$((64 * 1024 * 1024))  # what one device call takes: working tree and carried paths

# Seconds. SESSION is the whole call (the device allows 600; the rest is margin for the
# machine's own start of the command); each phase gets its budget or what is left, if less.
# The environment may lower them (tests/test_gpu_session.py runs the session in seconds).
SESSION=${SESSION:-540}
ENV_BUDGET=${ENV_BUDGET:-20}
INSTALL_BUDGET=${INSTALL_BUDGET:-100}
BENCH_BUDGET=${BENCH_BUDGET:-330}  # export inside (155 s, fp32 fast path, H100), eager, ORT
COMPILE_BUDGET=${COMPILE_BUDGET:-120}  # torch.compile's row: 75 s to compile on an H100, timed calls
TRT_MIN=${TRT_MIN:-60}  # the TensorRT phase runs only with this much left
# two fp32 SD 1.5 U-Net exports on the host's CPUs (~60-90 s), then 2 x 4 sets of ORT CUDA calls
LORA_BUDGET=${LORA_BUDGET:-150}
LORA_MIN=${LORA_MIN:-120}  # the LoRA phase runs only with this much left
LORA_WORK=/tmp/sdrt-lora

# The sdrt command lines (arguments after `sdrt`); --dry-run parses each with the CLI's parser.
BENCH=(bench --random-weights sd15 --device cuda --steps 50 --height 512 --width 512
    --max-memory 0 --warmup 1 --iterations 3 --batch-sizes 1 --out "$OUT/bench")
TRT_EXPORT=(export --random-weights sd15 "$TRT_BUNDLE" --dtype fp16 --max-memory 0)
TRT_BUILD=(build "$TRT_BUNDLE" --static 512x512)
TRT_GENERATE=(generate "$TRT_BUNDLE" --prompt "a red bicycle" --steps 30 --height 512
    --width 512 --backend tensorrt --device cuda --output "$OUT/trt.png")
COMMANDS=(BENCH TRT_EXPORT TRT_BUILD TRT_GENERATE)
SDRT=("$PYTHON" -m sdrt.cli)
# python -m sdrt.benchmarks.lora ARGS; its report is rewritten as each part ends
LORA=(--preset sd15 --size 512 --rank 32 --device cuda --repeats 5 --work "$LORA_WORK"
    --json "$OUT/lora.json")

START=$(date +%s)
left() { echo $((START + SESSION - $(date +%s))); }
log() { echo "[$(date -u +%H:%M:%S) +$(($(date +%s) - START))s] $*" | tee -a "$OUT/session.log"; }

# phase BUDGET NAME COMMAND...: run under `timeout` for BUDGET seconds or what is left, if
# less; SIGTERM first (sdrt cleans its temporaries on it), SIGKILL 10 s later.
phase() {
    local budget=$1 name=$2 limit rc
    shift 2
    limit=$(( budget < $(left) - 15 ? budget : $(left) - 15 ))
    if [ "$limit" -lt 5 ]; then
        log "$name: skipped, ${limit}s left"
        return 124
    fi
    log "$name: start (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/session.log"
    rc=${PIPESTATUS[0]}
    log "$name: exit $rc"
    return "$rc"
}

cmd_environment() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
    "$PYTHON" -c 'import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
    free -g | head -2
    df -h /tmp | tail -1
}

cmd_install() {
    local pieces
    pieces=$(find .devpack -mindepth 1 -maxdepth 1 -type d 2>/dev/null | sort -V | tail -1)
    if [ -n "$pieces" ]; then
        bash "$pieces/recv.sh" || return
    else
        echo "no .devpack carried: using what /tmp/site holds"
    fi
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation --no-index --upgrade \
        --target /tmp/sdrt . || return
    # issue 17 item 1 on real hardware: in a process that never imports torch, the CUDA
    # provider must find its libraries through preload_dlls and the nvidia-* wheels
    "$PYTHON" -c 'import sys
import onnxruntime as ort
from sdrt.backends import onnxruntime as b
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
print("--device auto takes", b.providers_for("auto"))  # preload_dlls, then the probe
print("torch-free CUDA provider starts:", b.cuda_provider_starts(), "| torch imported:",
      "torch" in sys.modules)'
}

tensorrt() {
    if ! "$PYTHON" -c 'import tensorrt' 2>/dev/null; then
        log "TensorRT skipped: $("$PYTHON" -c 'import tensorrt' 2>&1 | tail -1)"
        return 0
    fi
    log "tensorrt $("$PYTHON" -c 'import tensorrt; print(tensorrt.__version__)')"
    phase 240 "export for TensorRT" "${SDRT[@]}" "${TRT_EXPORT[@]}" &&
        phase 300 "TensorRT build (512x512)" "${SDRT[@]}" "${TRT_BUILD[@]}" &&
        phase 120 "TensorRT generate" "${SDRT[@]}" "${TRT_GENERATE[@]}"
}

cmd_session() {
    mkdir -p "$OUT"
    export PYTHONPATH=/tmp/site:/tmp/sdrt PYTHONUNBUFFERED=1
    phase "$ENV_BUDGET" environment bash "$SELF" environment > "$OUT/env.txt"
    phase "$INSTALL_BUDGET" install bash "$SELF" install || { log "install failed"; return 1; }
    local compile=--no-torch-compile budget=$BENCH_BUDGET
    if [ "$(left)" -ge $((BENCH_BUDGET + COMPILE_BUDGET + 15)) ]; then
        compile=--torch-compile budget=$((BENCH_BUDGET + COMPILE_BUDGET))
    fi
    phase "$budget" "sdrt bench 512x512 50 steps $compile" "${SDRT[@]}" "${BENCH[@]}" "$compile"
    if [ "$(left)" -ge "$LORA_MIN" ]; then
        cmd_lora
    else
        log "LoRA phase skipped: $(left)s left (run it alone: bash $SELF lora)"
    fi
    if [ "$(left)" -ge "$TRT_MIN" ]; then
        tensorrt
    else
        log "TensorRT phase skipped: $(left)s left"
    fi
    log "session done"
}

cmd_lora() {
    mkdir -p "$OUT"
    export PYTHONPATH=/tmp/site:/tmp/sdrt PYTHONUNBUFFERED=1
    phase "$LORA_BUDGET" "LoRA branch (SD 1.5 U-Net 512x512, R=32, ORT CUDA)" \
        "$PYTHON" -m sdrt.benchmarks.lora "${LORA[@]}"
}

cmd_pack() {
    local pack=${DEVICE_PACK:-../shared/tools/device-pack} n k
    "$pack" "${WHEELS[@]}" || exit 1
    printf '%s\n' "${WHEELS[@]}" > .devpack/wheels.txt
    n=$(find .devpack -mindepth 1 -maxdepth 1 -type d | wc -l)
    echo "then, one run each while the machine stays warm (30 s):"
    for k in $(seq 1 $((n - 1))); do
        echo "  run(carry=['.devpack/$k'], command='bash .devpack/$k/recv.sh', timeout_s=60)"
    done
    echo "  run(carry=['.devpack/$n'], command='bash benchmarks/gpu_session.sh', timeout_s=600)"
}

cmd_commands() {
    local name
    for name in "${COMMANDS[@]}"; do
        local -n args=$name
        printf '%q ' "${args[@]}"
        echo
    done
}

cmd_lora_args() {
    printf '%q ' "${LORA[@]}"
    echo
}

# Bytes that travel with every call: tracked files and untracked ones git does not ignore.
tree_bytes() {
    git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 |
        cut -f1
}

cmd_dry_run() {
    local failed=0 name tree piece size total
    echo "plan: one device call, timeout_s 600, the script itself ends by ${SESSION}s"
    echo "  environment ${ENV_BUDGET}s -> $OUT/env.txt"
    echo "  install ${INSTALL_BUDGET}s: ${WHEELS[*]} -> /tmp/site; sdrt -> /tmp/sdrt"
    echo "  sdrt bench ${BENCH_BUDGET}s, +${COMPILE_BUDGET}s with torch.compile -> $OUT/bench"
    echo "  LoRA ${LORA_BUDGET}s with ${LORA_MIN}s or more left -> $OUT/lora.json"
    echo "  TensorRT with ${TRT_MIN}s or more left, where it imports"
    [ "$LORA_MIN" -le "$LORA_BUDGET" ] && [ $((LORA_BUDGET + 15)) -le "$SESSION" ] ||
        { echo "FAIL: the LoRA phase's budget does not fit"; failed=1; }
    [ $((ENV_BUDGET + INSTALL_BUDGET + BENCH_BUDGET + 45)) -le "$SESSION" ] &&
        [ "$SESSION" -le 540 ] ||
        { echo "FAIL: the phases' budgets do not fit in ${SESSION}s (at most 540)"; failed=1; }
    echo "command lines:"
    cmd_commands | sed 's/^/  sdrt /'
    cmd_commands | "$PYTHON" -c 'import shlex, sys
from sdrt.cli import _parser
parser = _parser()
for line in sys.stdin:
    args = parser.parse_args(shlex.split(line))  # exits 2 on an unknown option
    assert callable(args.handler), line
print("  each one parses with the sdrt CLI")' || { echo "FAIL: a command line"; failed=1; }
    echo "  python -m sdrt.benchmarks.lora $(cmd_lora_args)"
    cmd_lora_args | "$PYTHON" -c 'import shlex, sys
from sdrt.benchmarks.lora import arguments
arguments().parse_args(shlex.split(sys.stdin.read()))  # exits 2 on an unknown option
print("  it parses with the LoRA benchmark'"'"'s parser")' ||
        { echo "FAIL: the LoRA command line"; failed=1; }
    echo "wheels:"
    for name in "${WHEELS[@]}"; do
        [[ $name =~ ^[A-Za-z0-9._-]+==[0-9][A-Za-z0-9.]*$ ]] ||
            { echo "FAIL: $name is not NAME==VERSION"; failed=1; }
        echo "  $name"
    done
    [ "$(printf '%s\n' "${WHEELS[@]%%==*}" | sort -fu | wc -l)" -eq "${#WHEELS[@]}" ] ||
        { echo "FAIL: a wheel is listed twice"; failed=1; }
    tree=$(tree_bytes)
    echo "carry: the working tree is $((tree / 1024)) KiB"
    if [ -d .devpack ]; then
        [ "$(cat .devpack/wheels.txt 2>/dev/null)" = "$(printf '%s\n' "${WHEELS[@]}")" ] ||
            { echo "FAIL: .devpack holds other wheels; run: bash $0 pack"; failed=1; }
        for piece in $(find .devpack -mindepth 1 -maxdepth 1 -type d | sort -V); do
            size=$(du -cb "$piece" | tail -1 | cut -f1)
            total=$((tree + size))
            echo "  $piece: $((size / 1048576)) MiB, with the tree $((total / 1048576)) MiB"
            [ "$total" -le "$CARRY_LIMIT" ] || { echo "FAIL: $piece is over 64 MiB"; failed=1; }
        done
    else
        echo "  not packed yet (bash $0 pack): pieces of at most 56 MiB each"
        [ $((tree + 56 * 1048576)) -le "$CARRY_LIMIT" ] ||
            { echo "FAIL: the tree and one piece are over 64 MiB"; failed=1; }
    fi
    [ "$failed" = 0 ] && echo "dry run: ok"
    return "$failed"
}

case "${1:-}" in
    "") cmd_session ;;
    --dry-run) cmd_dry_run ;;
    environment) cmd_environment ;;
    install) cmd_install ;;
    lora) cmd_lora ;;
    lora-args) cmd_lora_args ;;
    pack) cmd_pack ;;
    commands) cmd_commands ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
esac
