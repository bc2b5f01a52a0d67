"""bench/device_check.sh as the lent GPU machine will run it, dry-run here on the CPU: a copy
of the tree without .git, the machine's python3 being a virtualenv's, no network, no
animal-mnist, no nvidia-smi or git on PATH. Every GPU stage must report "no GPU" and the
whole script must end well inside a minute. Plus the pieces it relies on: the synthetic
training data, the short training run, and the summary table."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench import device_summary, train_short

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["gpu-tests", "kernel-bench", "step-bench", "step-compiled", "train-short"]
TOOLS = ["bash", "timeout", "date", "mkdir", "tee", "cat", "rm", "dirname", "column"]


def _fake_gpu_machine(tmp: Path) -> tuple[Path, dict[str, str]]:
    """(tree, env): the tree copied without .git, PATH holding only basic tools and a
    python3 that runs this virtualenv's interpreter, animal_mnist made unimportable,
    every proxy pointing at a closed port."""
    tree = tmp / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", "build", "runs", "device-out", "bench-out", "__pycache__", "*.egg-info",
        ".ruff_cache", ".pytest_cache"))
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        if (path := shutil.which(tool)) is not None:
            (bin_dir / tool).symlink_to(path)
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    blocked = tmp / "blocked" / "animal_mnist"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text(
        "raise ImportError('animal-mnist is not on the GPU machine')\n")
    env = {"PATH": str(bin_dir), "HOME": str(tmp), "PYTHONPATH": str(blocked.parent),
           "OUT": str(tmp / "out"), "SDDIT_COMMIT": "test-commit-0123",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
           "OMP_NUM_THREADS": "1"}
    return tree, env


@pytest.mark.timeout(170)
def test_dry_run_without_gpu_network_data_or_git(tmp_path: Path) -> None:
    tree, env = _fake_gpu_machine(tmp_path)
    assert not (tree / ".git").exists()
    start = time.monotonic()
    proc = subprocess.run(["bash", "bench/device_check.sh"], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=150)
    elapsed = time.monotonic() - start
    out = tmp_path / "out"
    log = (out / "device_check.log").read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s"
    assert "Traceback" not in log, log[-3000:]
    assert "commit: test-commit-0123" in proc.stdout
    stages = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()]
    assert [s[0] for s in stages] == STAGES
    summary = proc.stdout[proc.stdout.index("stage "):]
    for name in STAGES:
        line = next(ln for ln in summary.splitlines() if ln.startswith(name))
        assert "no GPU" in line, line
    for name in ("kernels", "step", "step_compiled", "train_short"):
        data = json.loads((out / f"{name}.json").read_text())
        assert data["status"] == "no GPU", name
        assert data["env"]["commit"] == "test-commit-0123", name
    assert len(list(out.iterdir())) <= 8  # what the lent machine sends back


def test_synthetic_silhouettes_look_like_animal_mnist() -> None:
    images, labels = train_short.synthetic_silhouettes(num=2000, seed=3)
    assert images.shape == (2000, 32, 32) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [200] * 10
    assert not images[:, :2].any() and not images[:, :, -2:].any()  # padded like the real set
    means = np.stack([images[labels == k].mean(0) for k in range(10)]) / 255  # [10, 32, 32]
    gaps = np.abs(means[:, None] - means[None]).mean((-1, -2))  # [10, 10]
    assert gaps[~np.eye(10, dtype=bool)].min() > 0.01  # every class differs from the others
    again, _ = train_short.synthetic_silhouettes(num=2000, seed=3)
    assert np.array_equal(images, again)


@pytest.mark.timeout(240)
def test_short_run_trains_without_animal_mnist(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "animal_mnist", None)  # any import of it now fails
    out = tmp_path / "train_short.json"
    rc = train_short.main([
        "--steps", "3", "--minutes", "0", "--run-dir", str(tmp_path / "run"), "--out", str(out),
        "--set", "schedule.batch_size=8", "--set", "schedule.log_every=1",
        "--set", "schedule.sample_per_class=1", "--set", "schedule.sample_steps=2",
        "--set", "run.progress_bar=false", "--set", "run.tensorboard=false",
        "--set", "run.device=\"cpu\""])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["status"] == "complete" and data["steps"] == 3
    assert "synthetic" in data["data"]
    assert os.path.isfile(data["checkpoint"])
    assert data["last_train_records"][-1]["images_per_s"] > 0
    assert np.isfinite(data["final_loss"])


def test_summary_reads_each_stage(tmp_path: Path) -> None:
    (tmp_path / "kernels.json").write_text(json.dumps({
        "status": "running: 2 of 17", "results": [{"op": "a"}, {"op": "b", "error": "x"}],
        "not_run": ["c"] * 15}))
    (tmp_path / "step.json").write_text(json.dumps({"status": "complete", "results": [
        {"path": "eager", "images_per_s": 101.0}, {"path": "kernels", "images_per_s": 140.4}]}))
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite tests="10" failures="1" errors="0" skipped="2"/></testsuites>')
    rows = [["gpu-tests", "1", "50", "gpu_tests.xml"],
            ["kernel-bench", "124", "85", "kernels.json"],
            ["step-bench", "0", "40", "step.json"],
            ["step-compiled", "137", "100", "step_compiled.json"],
            ["train-short", "0", "0", "status:no GPU"]]
    lines = device_summary.table(str(tmp_path), rows).splitlines()
    assert "7 passed, 1 failed, 2 skipped" in lines[1]
    assert "TIME BOX HIT" in lines[2] and "1 timings" in lines[2] and "15 not run" in lines[2]
    assert "1 failed" in lines[2]
    assert "eager 101 img/s" in lines[3] and "kernels 140 img/s" in lines[3]
    assert "TIME BOX HIT (nothing written)" in lines[4]
    assert "no GPU" in lines[5]
