#!/usr/bin/env bash
# The first GPU session's measurements, prepared in advance (about 10 minutes of device time on
# an H100/H200 with Python 3.12 and torch 2.11 + CUDA 13, no registry, no diffusers and no
# onnxruntime-gpu installed). Every step is time-boxed and prints what it measured; results go
# under $OUT (at most 8 files come back).
#
#   here:   bash benchmarks/gpu_session.sh pack        wheels -> .devpack/1..N (device-pack)
#   device: bash .devpack/K/recv.sh                    one `run` per piece, carry .devpack/K
#   device: bash benchmarks/gpu_session.sh export      SD 1.5 fast-path bundle + images (<= 9 min)
#   device: bash benchmarks/gpu_session.sh bench       sdrt bench 512x512 50 steps (<= 6 min)
#   device: bash benchmarks/gpu_session.sh trt         TensorRT, if `import tensorrt` works there
#   device: bash benchmarks/gpu_session.sh lora        run-time LoRA branch cost, SD 1.5 (<= 9 min)
#   here:   bash benchmarks/gpu_session.sh commands    the sdrt command lines, one per line
# The limits are ceilings for a first run whose export time is unknown; the pieces take about a
# minute. Run `trt` only with device time left: it skips at once where TensorRT is absent.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-session-out}
BUNDLE=/tmp/sdrt-sd15-fast
TRT_BUNDLE=/tmp/sdrt-sd15-trt
WHEELS=(onnxruntime-gpu==1.31.1 diffusers==0.42.1 importlib_metadata==10.2.0)

# The sdrt command lines (arguments after `sdrt`); tests/test_gpu_session.py parses each.
EXPORT=(export --random-weights sd15 "$BUNDLE" --dtype fp16 --fused-attention --cuda-fusions
    --static-size 512x512)
INFO=(info "$BUNDLE")
GENERATE=(generate "$BUNDLE" --prompt "a red bicycle leaning on a wall, watercolor" --steps 30
    --height 512 --width 512 --scheduler dpmpp_2m --seed 0 --device cuda
    --output "$OUT/generate.png")
BENCH=(bench --random-weights sd15 --bundle "$BUNDLE" --device cuda --steps 50 --height 512
    --width 512 --no-torch-compile --warmup 1 --iterations 3 --batch-sizes 1
    --out "$OUT/bench")
TRT_EXPORT=(export --random-weights sd15 "$TRT_BUNDLE" --dtype fp16)
TRT_BUILD=(build "$TRT_BUNDLE" --static 512x512)
TRT_GENERATE=(generate "$TRT_BUNDLE" --prompt "a red bicycle" --steps 30 --height 512
    --width 512 --backend tensorrt --device cuda --output /tmp/sdrt-trt.png)

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/session.log"; }

# step SECONDS NAME COMMAND...: run with a time limit, log its wall time and exit status
step() {
    local limit=$1 name=$2 start rc
    shift 2
    start=$(date +%s)
    log "$name: start (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$OUT/session.log"
    rc=${PIPESTATUS[0]}
    log "$name: exit $rc after $(($(date +%s) - start)) s"
    return "$rc"
}

SDRT=(python3 -m sdrt.cli)

setup() {
    mkdir -p "$OUT"
    export PYTHONPATH=/tmp/site:/tmp/sdrt PYTHONUNBUFFERED=1
    if [ ! -d /tmp/sdrt/sdrt ]; then
        step 120 "install sdrt" python3 -m pip install -q --no-deps --no-build-isolation \
            --no-index --target /tmp/sdrt . || exit 1
    fi
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        python3 -c 'import sys, torch, onnxruntime as ort
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())'
    } 2>&1 | tee "$OUT/env.txt"
}

cmd_pack() {
    local pack=${DEVICE_PACK:-../shared/tools/device-pack}
    "$pack" "${WHEELS[@]}" || exit 1
    local n
    n=$(find .devpack -mindepth 1 -maxdepth 1 -type d | wc -l)
    echo "then, with the machine warm, one run each:"
    for k in $(seq 1 "$n"); do
        echo "  run(carry=['.devpack/$k'], command='bash .devpack/$k/recv.sh', timeout_s=120)"
    done
    echo "  run(command='bash benchmarks/gpu_session.sh export', timeout_s=600)"
    echo "  run(command='bash benchmarks/gpu_session.sh bench', timeout_s=360)"
    echo "  run(command='bash benchmarks/gpu_session.sh trt', timeout_s=600)  # with time left"
}

cmd_export() {
    setup
    rm -rf "$BUNDLE"
    /usr/bin/time -v true >/dev/null 2>&1 && timer=(/usr/bin/time -v) || timer=()
    step 420 "export SD 1.5 fast path" "${timer[@]}" "${SDRT[@]}" "${EXPORT[@]}" || return
    step 30 "info" "${SDRT[@]}" "${INFO[@]}"
    cp "$BUNDLE/manifest.json" "$OUT/manifest.json"
    # twice: the first run also pays the cuDNN algorithm search (EXHAUSTIVE) and graph capture
    step 80 "generate (first)" "${SDRT[@]}" "${GENERATE[@]}"
    step 40 "generate (second)" "${SDRT[@]}" "${GENERATE[@]}"
}

cmd_bench() {
    setup
    local args=() skip=0 arg
    if [ ! -f "$BUNDLE/manifest.json" ]; then
        log "no $BUNDLE on this machine (a fresh one?): the bench exports its own fast path"
        for arg in "${BENCH[@]}"; do  # BENCH without `--bundle DIR`
            if [ "$arg" = --bundle ]; then skip=1; elif [ $skip = 1 ]; then skip=0
            else args+=("$arg"); fi
        done
        BENCH=("${args[@]}")
    fi
    step 330 "sdrt bench 512x512 50 steps" "${SDRT[@]}" "${BENCH[@]}"
}

cmd_trt() {
    setup
    if python3 -c 'import tensorrt' 2>/dev/null; then
        log "tensorrt $(python3 -c 'import tensorrt; print(tensorrt.__version__)')"
        step 240 "export for TensorRT" "${SDRT[@]}" "${TRT_EXPORT[@]}" &&
            step 300 "TensorRT build (512x512)" "${SDRT[@]}" "${TRT_BUILD[@]}" &&
            step 120 "TensorRT generate" "${SDRT[@]}" "${TRT_GENERATE[@]}"
    else
        log "TensorRT skipped: $(python3 -c 'import tensorrt' 2>&1 | tail -1)"
    fi
}

cmd_lora() {
    setup
    step 540 "run-time LoRA cost, SD 1.5 512x512 R=32" python3 -m sdrt.benchmarks.lora \
        --preset sd15 --size 512 --rank 32 --device cuda --work /tmp/sdrt-lora \
        --json "$OUT/lora.json"
}

cmd_commands() {
    for name in EXPORT INFO GENERATE BENCH TRT_EXPORT TRT_BUILD TRT_GENERATE; do
        local -n args=$name
        printf '%q ' "${args[@]}"
        echo
    done
}

case "${1:-}" in
    pack) cmd_pack ;;
    export) cmd_export ;;
    bench) cmd_bench ;;
    trt) cmd_trt ;;
    lora) cmd_lora ;;
    commands) cmd_commands ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
esac
