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
STAGE_TESTS_S=${STAGE_TESTS_S:-150}
STAGE_BENCH_S=${STAGE_BENCH_S:-270}

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

echo
echo "stage             exit   seconds"
fail=0
for i in "${!NAMES[@]}"; do
  printf '%-17s %4s %9s\n' "${NAMES[$i]}" "${CODES[$i]}" "${SECS[$i]}"
  [ "${CODES[$i]}" = 0 ] || fail=1
done
echo "results in $OUT (log: $LOG)"
exit $fail
