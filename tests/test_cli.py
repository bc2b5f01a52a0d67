"""The `sddit` CLI: train a few steps of tiny, sample it (through `python -m sddit`),
config errors, and a seconds-long demo."""

import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from sddit.cli import main
from train.logging_utils import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--set", "model.overrides={hidden_size=32, depth=2, num_heads=2, patch_size=8, "
         "head_hidden_dim=32, head_bottleneck_dim=16, n_prototypes=32}"]


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def test_train_then_sample(tmp_path, capsys) -> None:
    run = str(tmp_path / "run")
    rc = main(["train", "--config", os.path.join(ROOT, "configs", "tiny.toml"), *SMALL,
               *_sets("schedule.batch_size=8", "schedule.total_steps=3", "schedule.log_every=1",
                      "schedule.sample_steps=2", "schedule.sample_per_class=1",
                      "run.progress_bar=false", f"run.dir={json.dumps(run)}")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "loss curve" in out
    assert os.path.isfile(os.path.join(run, "ckpt-00000003.pt"))

    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "sddit", "sample", "--ckpt", run,
                           "--num", "6", "--steps", "2", "--classes", "0", "3", "--out",
                           str(tmp_path / "s"), "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    npz = np.load(tmp_path / "s" / "step00000003_cfg1_n6.npz")
    assert npz["arr_0"].shape == (6, 32, 32, 1) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].tolist() == [0, 3, 0, 3, 0, 3]
    assert Image.open(tmp_path / "s" / "step00000003_cfg1_n6.png").size[0] > 64


def test_unknown_key_is_a_clean_error(capsys) -> None:
    assert main(["train", "--config", os.path.join(ROOT, "configs", "tiny.toml"),
                 "--set", "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err


def test_resume_from_cli_continues(tmp_path, capsys) -> None:
    run = str(tmp_path / "run")
    common = ["train", "--config", os.path.join(ROOT, "configs", "tiny.toml"), *SMALL,
              *_sets("schedule.batch_size=8", "schedule.log_every=1", "schedule.sample_steps=1",
                     "schedule.sample_per_class=1", "run.progress_bar=false",
                     f"run.dir={json.dumps(run)}")]
    assert main(common + _sets("schedule.total_steps=2")) == 0
    assert main(common + _sets("schedule.total_steps=4") + ["--resume"]) == 0
    rows = read_jsonl(os.path.join(run, "metrics.jsonl"))
    starts = [r for r in rows if r["event"] == "start"]
    assert starts[1]["step"] == 2 and starts[1]["resumed_from"].endswith("ckpt-00000002.pt")
    assert [r["step"] for r in rows if r["event"] == "train"] == [1, 2, 3, 4]


def test_demo_runs_end_to_end_in_seconds(tmp_path, capsys) -> None:
    out = str(tmp_path / "demo")
    rc = main(["demo", "--minutes", "0.04", "--fid-samples", "0", "--out", out, "--device",
               "cpu", *SMALL, *_sets("schedule.sample_steps=2", "schedule.sample_per_class=2",
                                     "schedule.batch_size=8", "run.progress_bar=false")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "sample grid" in text and "FID: skipped" in text
    assert os.path.isfile(os.path.join(out, "loss_curve.png"))
    assert any(f.endswith(".png") for f in os.listdir(os.path.join(out, "samples")))


def test_demo_is_bounded_by_steps_not_by_machine_load(tmp_path, capsys) -> None:
    out = str(tmp_path / "demo")
    rc = main(["demo", "--steps", "3", "--fid-samples", "0", "--grid-cfg-scale", "1",
               "--out", out, "--device", "cpu", *SMALL,
               *_sets("schedule.sample_steps=2", "schedule.sample_per_class=1",
                      "schedule.batch_size=8", "run.progress_bar=false")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "3 steps, stopped by total_steps" in text
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps must be a positive integer" in capsys.readouterr().err
