#!/usr/bin/env bash
# The one script to run when a GPU is lent (DESIGN.md, "The lent GPU").
#   SDDIT_COMMIT=$(git rev-parse HEAD) bash bench/device_check.sh   # from the repository root
#
# Uses the machine's python3 and its packages as they are: it installs nothing and needs no
# network, no .git (the commit comes from SDDIT_COMMIT) and no data package (the training run
# uses synthetic silhouettes). Writes under ${OUT:-./device-out}:
#   gpu_tests.xml  kernels.json  step.json  step_compiled.json  train_short.json
#   stages.tsv  device_check.log   (7 files; the lent machine returns at most 8)
# Stages, each in its own time box, each writing its results as it goes:
#   1. gpu-tests      pytest -m gpu (in parallel with pytest-xdist when installed)
#   2. kernel-bench   every fused op vs eager and torch.compile (stops itself at its budget)
#   3. step-bench     the real training step: eager, kernels, then kernels with torch's
#                     optimizer and kernels as a CUDA graph (one change each)
#   4. step-compiled  the same, compiled paths (cold compiles last, in their own box)
#   5. train-short    a short real run of the trainer
# About 6 minutes in all (so that a second try fits in the lease), then a summary table.
# Without a GPU every stage says "no GPU" within seconds (tests/test_device_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./device-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
TSV="$OUT/stages.tsv"
: > "$LOG"
: > "$TSV"
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1
# Keep compile caches off $OUT: only results travel back.
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/sddit-triton-cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/sddit-inductor-cache}
unset TRITON_INTERPRET
export SDDIT_COMMIT=${SDDIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}

# Stage limits in seconds (override, e.g. STAGE_KERNELS_S=200); 360 s together.
STAGE_TESTS_S=${STAGE_TESTS_S:-60}
STAGE_KERNELS_S=${STAGE_KERNELS_S:-75}
STAGE_STEP_S=${STAGE_STEP_S:-95}
STAGE_COMPILE_S=${STAGE_COMPILE_S:-85}
STAGE_TRAIN_S=${STAGE_TRAIN_S:-45}
STEP_MODEL=${STEP_MODEL:-SD-DiT-XL/2}
STEP_ARGS=(--model "$STEP_MODEL" --batch 32 --steps 20 --warmup 5 --profile-steps 3 --gpu-only)

stage() {  # stage NAME LIMIT_S RESULT_FILE CMD...   (RESULT_FILE: under $OUT, or -)
  local name=$1 limit=$2 result=$3 start rc
  shift 3
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" < /dev/null >> "$LOG" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$result" >> "$TSV"
  echo "=== $name: exit $rc after $(( $(date +%s) - start ))s" | tee -a "$LOG"
}

skip() {  # skip NAME REASON
  printf '%s\t0\t0\tstatus:%s\n' "$1" "$2" >> "$TSV"
  echo "=== $1: $2" | tee -a "$LOG"
}

{
  echo "commit: $SDDIT_COMMIT"
  timeout 15 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv 2>&1 || echo "nvidia-smi: not available"
  timeout 60 "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', \
triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1 || echo "torch/triton: import failed"
} 2>&1 | tee -a "$LOG"
HAS_GPU=$(timeout 60 "$PY" -c "import torch; print(int(torch.cuda.is_available()))" \
  2>/dev/null || echo 0)

if [ "$HAS_GPU" = 1 ]; then
  XDIST=()
  if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 4); fi
  stage gpu-tests "$STAGE_TESTS_S" gpu_tests.xml "$PY" -m pytest -m gpu -q -p no:cacheprovider \
    "${XDIST[@]}" tests --junitxml="$OUT/gpu_tests.xml"
else
  skip gpu-tests "no GPU"
fi
stage kernel-bench "$STAGE_KERNELS_S" kernels.json "$PY" -m bench.kernels \
  --budget-s $(( STAGE_KERNELS_S - 20 )) --out "$OUT/kernels.json"
stage step-bench "$STAGE_STEP_S" step.json "$PY" -m bench.step "${STEP_ARGS[@]}" \
  --paths eager,kernels,kernels+torch-optim,kernels+graphs --out "$OUT/step.json"
stage step-compiled "$STAGE_COMPILE_S" step_compiled.json "$PY" -m bench.step \
  "${STEP_ARGS[@]}" --paths compile,kernels+compile --out "$OUT/step_compiled.json"
rm -rf /tmp/sddit-train-short
stage train-short "$STAGE_TRAIN_S" train_short.json "$PY" -m bench.train_short --gpu-only \
  --minutes 0.35 --run-dir /tmp/sddit-train-short --set run.progress_bar=false \
  --out "$OUT/train_short.json"

echo | tee -a "$LOG"
timeout 30 "$PY" -m bench.device_summary "$OUT" "$TSV" 2>&1 | tee -a "$LOG" \
  || column -t "$TSV" | tee -a "$LOG"
echo "results in $OUT (log: $LOG)"
fail=0
while IFS=$'\t' read -r _ rc _ _; do [ "$rc" = 0 ] || fail=1; done < "$TSV"
exit $fail
