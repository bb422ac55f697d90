#!/usr/bin/env bash
# GPU check of issue 25 (<= 7 min, plus <= 3 min to create the venv): the CUDA tests, the bench_scale rows with --device cuda, and one
# fine-tuning epoch on the GPU vs the CPU with --amp bf16. Run from the repository root on a fresh
# machine:  bash benchmarks/gpu_check.sh
# Creates .venv (python3 -m venv .venv && pip install -e '.[test]') unless it exists. Every step has
# its own timeout and a failing step does not stop the others; a summary ends the output. The whole
# output also goes to $OUT/gpu_check.txt when OUT is set (else ./gpu_check.txt).
set -u

START=$(date +%s)
LOG="${OUT:-.}/gpu_check.txt"
mkdir -p "$(dirname "$LOG")"
exec > >(tee "$LOG") 2>&1

SUMMARY=()
step() {  # step NAME SECONDS COMMAND...: run with a timeout, record the outcome, never exit
    local name=$1 limit=$2; shift 2
    echo
    echo "=== $name (timeout ${limit}s): $*"
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    local what="ok"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="TIMEOUT"
    [ "$rc" -ne 0 ] && [ "$what" = "ok" ] && what="FAILED (exit $rc)"
    SUMMARY+=("$(printf '%-28s %-18s %4ss' "$name" "$what" "$took")")
}

echo "gpu_check.sh: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"

if [ -x .venv/bin/python ]; then
    echo "reusing .venv"
else
    step "venv + pip install" 180 bash -c "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'"
fi
PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step "torch sees CUDA" 60 "$PY" -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0)); assert torch.cuda.is_available()"

step "pytest -m cuda" 60 "$PY" -m pytest -q -m cuda -p no:cacheprovider

# bench_scale rows on the GPU: the small cases first, so that the time limit cuts the large ones
step "bench_scale (cuda, small)" 100 "$PY" benchmarks/bench_scale.py --device cuda --timeout 40 \
    --case crepe-tiny-free --case crepe-tiny-calib --case up-svd --case up-tt --case down-svd --case down-tt
step "bench_scale (cuda, large)" 80 "$PY" benchmarks/bench_scale.py --device cuda --timeout 38 \
    --case crepe-full-free --case crepe-full-calib

# one fine-tuning epoch, GPU vs CPU, bf16 autocast on the GPU (seed-cnn on the embedded mnist-5k)
FT=$(mktemp -d)
step "finetune setup" 40 bash -c "$PY -m ttcompress train --arch seed-cnn --data mnist-5k --epochs 1 --max-batches 20 --device cpu -o $FT/base.pt >/dev/null && $PY -m ttcompress decompose $FT/base.pt -o $FT/small.tt.pt --cp-ranks 4 --tt-ranks 4 --device cuda >/dev/null"
timed_epoch() {  # timed_epoch DEVICE [ARGS...]: one fine-tuning epoch, its wall time
    local dev=$1; shift
    local t0=$(date +%s%N)
    "$PY" -m ttcompress finetune "$FT/small.tt.pt" --data mnist-5k --epochs 1 --device "$dev" "$@" \
        -o "$FT/ft-$dev.pt" --overwrite --json >/dev/null
    local rc=$?
    echo "finetune 1 epoch on $dev $*: $(( ($(date +%s%N) - t0) / 1000000 )) ms (exit $rc)"
    return $rc
}
export -f timed_epoch; export PY FT
step "finetune epoch cuda bf16" 40 bash -c "timed_epoch cuda --amp bf16"
step "finetune epoch cpu" 50 bash -c "timed_epoch cpu"
rm -rf "$FT"

echo
echo "=== summary ($(( $(date +%s) - START ))s in all)"
printf '%s\n' "${SUMMARY[@]}"
