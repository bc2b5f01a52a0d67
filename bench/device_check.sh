#!/usr/bin/env bash
# The one script to run when a GPU is lent (DESIGN.md, "The lent GPU").
#   bash bench/device_check.sh            # from the repository root
# Uses the machine's python3 and packages, installs nothing, writes under ${OUT:-./device-out}.
# Each stage is time-boxed so one slow stage cannot eat the lease; a summary table is last.
# At most a handful of files come back: JSON results, the junit XML, one bundled log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./device-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
: > "$LOG"
export PYTHONUNBUFFERED=1
# Keep compile caches off $OUT: only results travel back.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/sddit-triton-cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/sddit-inductor-cache}
unset TRITON_INTERPRET
# Stage limits in seconds (override, e.g. STAGE_BENCH_S=300).
# The four together stay within about 8 minutes (495 s).
STAGE_TESTS_S=${STAGE_TESTS_S:-120}
STAGE_BENCH_S=${STAGE_BENCH_S:-180}
STAGE_STEP_S=${STAGE_STEP_S:-120}
STAGE_TRAIN_S=${STAGE_TRAIN_S:-75}
TRAIN_MODEL=${TRAIN_MODEL:-SD-DiT-XL/2}

declare -a NAMES=() CODES=() SECS=()
stage() {  # stage NAME LIMIT_S CMD...
  local name=$1 limit=$2 start rc
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  start=$(date +%s)
  timeout --kill-after=15 "$limit" "$@" >> "$LOG" 2>&1
  rc=$?
  NAMES+=("$name"); CODES+=("$rc"); SECS+=("$(( $(date +%s) - start ))")
  echo "=== $name: exit $rc after ${SECS[-1]}s" | tee -a "$LOG"
}

{
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee -a "$LOG"

stage gpu-tests "$STAGE_TESTS_S" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests \
  --junitxml="$OUT/gpu_tests.xml"
stage kernel-bench "$STAGE_BENCH_S" "$PY" -m bench.kernels --out "$OUT/kernels.json"
stage train-step "$STAGE_STEP_S" "$PY" -m bench.train_step --model "$TRAIN_MODEL" --batch 32 \
  --steps 10 --warmup 3 --out "$OUT/train_step.json"
# A short real run of the trainer (tiny preset, GPU): its JSONL has images/s and telemetry.
rm -rf /tmp/sddit-train
stage train-tiny "$STAGE_TRAIN_S" "$PY" -m sddit train --config configs/tiny.toml \
  --set 'run.dir="/tmp/sddit-train"' --set schedule.total_steps=300 --set schedule.max_minutes=0.5
cp /tmp/sddit-train/metrics.jsonl "$OUT/train_tiny_metrics.jsonl" 2>/dev/null || true

echo
echo "stage             exit   seconds"
fail=0
for i in "${!NAMES[@]}"; do
  printf '%-17s %4s %9s\n' "${NAMES[$i]}" "${CODES[$i]}" "${SECS[$i]}"
  [ "${CODES[$i]}" = 0 ] || fail=1
done
echo "results in $OUT (log: $LOG)"
exit $fail
