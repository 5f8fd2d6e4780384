#!/usr/bin/env bash
# The GPU step benchmark, in one go (under 8 minutes on one H100): both input shapes, our
# step next to the official-style step, plus the variants that test the CREMA-D bf16 anomaly.
#
#   bash bench/gpu_check.sh                 # results in ./bench_out
#   OUT=/some/dir PYTHON=python3 bash bench/gpu_check.sh
#   DEVICE=cpu BENCH_ARGS="--small --batch_size 2 --iters 1 --warmup 1 --rounds 1 --threads 1 --variants fp32" \
#       bash bench/gpu_check.sh             # a dry run of the script itself (BENCH_ARGS come last and win)
#
# Writes (6 files): gpu_check.log (everything printed), cremad.json, cremad.profile.txt,
# kinetics_sounds.json, kinetics_sounds.profile.txt, cremad_b128.json.
# Imports torch, torchvision and onthefly's model / modulation / engine only (no librosa).
set -u
cd "$(dirname "$0")/.."
# The GPU machine may have no pip: onthefly is imported from code/ without being installed.
export PYTHONPATH="$PWD/code${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-./bench_out}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
BUDGET="${BUDGET:-450}"  # seconds for all runs together
read -r -a EXTRA <<<"${BENCH_ARGS:-}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu_check.log"
: >"$LOG"
start=$(date +%s)

log() { echo "$*" | tee -a "$LOG"; }

run() {  # run NAME LIMIT_S ARGS... : one bench process, cut at LIMIT_S or at the budget's end
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - start)))
    ((left < limit)) && limit=$left
    if ((limit < 20)); then
        log "== $name: skipped, $left s of the budget left"
        return
    fi
    log "== $name (at most ${limit} s): $PY bench/bench_step.py $* --out $OUT/$name.json"
    timeout "$limit" "$PY" bench/bench_step.py "$@" ${EXTRA[@]+"${EXTRA[@]}"} --out "$OUT/$name.json" 2>&1 | tee -a "$LOG"
    log "== $name: exit ${PIPESTATUS[0]} at $(($(date +%s) - start)) s"
}

{
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,temperature.gpu --format=csv
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())"
} 2>&1 | tee -a "$LOG"

COMMON=(--device "$DEVICE" --batch_size 64 --iters 20 --warmup 5 --rounds 3 --profile --profile_steps 3)

# CREMA-D shapes: every method, official vs ours; the precision / stem variants of the anomaly;
# then (second phase, next to a fresh `none` row) torch.compile and the whole step as a CUDA graph.
run cremad 210 "${COMMON[@]}" --shape cremad \
    --variants fp32,bf16+apad8,bf16+pad8,bf16+astem32,bf16+compile,bf16+graph@all,fp32+graph

# Kinetics-Sounds shapes (3 frames, 31 classes).
run kinetics_sounds 190 "${COMMON[@]}" --shape kinetics_sounds \
    --variants fp32,bf16+pad8,bf16+compile,bf16+graph@all,fp32+graph

# Host-bound check for the anomaly: does bf16 overtake fp32 once a step has twice the work?
run cremad_b128 50 --device "$DEVICE" --batch_size 128 --iters 10 --warmup 3 --rounds 3 --shape cremad \
    --no_official --methods none --variants fp32,bf16+apad8

log "== done in $(($(date +%s) - start)) s; results in $OUT"
