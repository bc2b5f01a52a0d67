"""Checkpoints: atomic writes survive a save that dies midway, keep-last-N, RNG round trip."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from train import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _payload(value: float) -> dict:
    return {"model": {"w": torch.full((64, 64), value)}, "note": "x"}


def test_keep_last_n(tmp_path) -> None:
    for step in range(1, 6):
        ckpt.save_checkpoint(str(tmp_path), step, _payload(step), keep_last=2)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [4, 5]
    latest = ckpt.latest_checkpoint(str(tmp_path))
    assert latest == ckpt.checkpoint_path(str(tmp_path), 5)
    assert ckpt.load_checkpoint(latest)["model"]["w"][0, 0] == 5


def test_save_that_fails_midway_leaves_previous_checkpoint(tmp_path, monkeypatch) -> None:
    run = str(tmp_path)
    good = ckpt.save_checkpoint(run, 1, _payload(1.0), keep_last=3)
    real_save = torch.save

    def dies_halfway(obj, f):  # writes half the real bytes, then the process "crashes"
        import io

        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        assert os.path.getsize(f.name) > 0
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(run, 2, _payload(2.0), keep_last=3)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(run) == good
    assert ckpt.load_checkpoint(good)["model"]["w"][0, 0] == 1.0
    assert not os.path.exists(ckpt.checkpoint_path(run, 2))
    name = os.path.basename(good)  # temporaries removed; the checkpoint and its checksum stay
    assert sorted(os.listdir(run)) == [name, name + ".sha256"]


def test_process_killed_during_saves_leaves_only_loadable_checkpoints(tmp_path) -> None:
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {ROOT!r})
        from train.checkpoint import save_checkpoint
        step = 0
        while True:  # 16 MB per save, so a kill is likely to land mid-write
            step += 1
            w = torch.full((4_000_000,), float(step))
            save_checkpoint({str(tmp_path)!r}, step, {{"model": {{"w": w}}}}, 100)
            print(step, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # one finished checkpoint exists
        proc.stdout.readline()
        time.sleep(0.05 + random.random() * 0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    found = ckpt.list_checkpoints(str(tmp_path))
    assert len(found) >= 2
    for step, path in found:  # every finished name is a whole checkpoint
        state = ckpt.load_checkpoint(path)
        assert state["step"] == step
        assert state["model"]["w"].shape == (4_000_000,)
        assert bool((state["model"]["w"] == step).all())
    assert ckpt.latest_checkpoint(str(tmp_path)) == found[-1][1]


def test_rng_state_round_trip() -> None:
    state = ckpt.capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(7), random.random()
    ckpt.restore_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_load_rejects_foreign_files(tmp_path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"a": 1}, path)
    with pytest.raises(ValueError, match="not an sddit checkpoint"):
        ckpt.load_checkpoint(str(path))
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(str(tmp_path / "missing.pt"))
