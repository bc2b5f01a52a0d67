"""scripts/setup_env.sh on a machine like the lent GPU's: python3 is itself a virtualenv
holding torch, and there is no package index. It must reuse that torch (a venv made with
--system-site-packages from a venv does not see it), install nothing, and not wait on pip."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(240)
def test_offline_setup_reuses_the_parent_virtualenvs_torch(tmp_path: Path) -> None:
    if sys.prefix == sys.base_prefix:
        pytest.skip("needs the test interpreter to be a virtualenv's (as make test's is)")
    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", "build", "runs", "device-out", "bench-out", "__pycache__", "*.egg-info",
        ".ruff_cache", ".pytest_cache"))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable,
           "SDDIT_OFFLINE": "1", "http_proxy": "http://127.0.0.1:9",
           "https_proxy": "http://127.0.0.1:9"}
    start = time.monotonic()
    proc = subprocess.run(["bash", "scripts/setup_env.sh"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.monotonic() - start < 120
    assert "package index: offline" in proc.stdout
    assert "is a virtualenv: its site-packages are on build/venv's path" in proc.stdout
    venv_python = tree / "build" / "venv" / "bin" / "python"
    check = subprocess.run(
        [str(venv_python), "-c", "import torch, bench; print(torch.__version__, bench.__file__)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert check.returncode == 0, check.stderr
    version, bench_file = check.stdout.split()
    assert version == __import__("torch").__version__
    assert Path(bench_file).is_relative_to(tree)  # the project is on the venv's path
    sddit = subprocess.run([str(tree / "build" / "venv" / "bin" / "sddit"), "--help"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert sddit.returncode == 0 and "sddit" in sddit.stdout
