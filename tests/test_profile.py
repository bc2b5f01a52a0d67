"""`sddit profile` on CPU: a real trace of 5 tiny steps with every phase named, and the
--static resource report with occupancy computed from it."""

import gzip
import json

import pytest
import torch

from bench import cli, profile

PHASES = {"data", "noise", "embed", "mask", "student_encoder", "teacher", "heads", "decoder",
          "losses", "backward", "grad_norm", "optimizer", "teacher_ema", "sampling_ema"}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    rc = cli.main(["profile", "--model", "SD-DiT-tiny", "--steps", "5", "--batch", "4",
                   "--device", "cpu", "--out-dir", str(out)])
    assert rc == 0
    return out


def test_writes_perfetto_trace_and_tensorboard_profile(out_dir) -> None:
    trace = json.loads((out_dir / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    missing = {p for p in PHASES if f"phase:{p}" not in names}
    assert not missing, missing
    (tb,) = (out_dir / "tensorboard").glob("*.pt.trace.json.gz")
    with gzip.open(tb) as f:
        assert json.load(f)["traceEvents"]


def test_per_phase_table_and_top_kernels(out_dir) -> None:
    report = json.loads((out_dir / "profile.json").read_text())
    assert report["steps"] == 5 and report["device"] == "cpu"
    rows = {r["phase"]: r for r in report["phases"]}
    assert set(rows) >= PHASES, PHASES - set(rows)
    assert all(rows[p]["ms_per_step"] > 0 for p in PHASES)
    assert sum(r["pct"] for r in report["phases"]) == pytest.approx(100.0)
    # ordered like the step runs, data first
    assert report["phases"][0]["phase"] == "data"
    assert report["top_kernels"] and report["top_kernels"][0]["ms_per_step"] > 0
    assert sum(report["shares"].values()) == pytest.approx(1.0)


def test_ranges_are_removed_afterwards() -> None:
    import model
    import model.methods as methods
    import train.step as step_module

    originals = (methods.edm_loss, methods.precondition, step_module.record_function)
    net = model.build("SD-DiT-tiny")
    with profile.phase_ranges(net, nvtx=False):
        assert methods.edm_loss is not originals[0]
        assert net.backbone.x_embedder._forward_pre_hooks
        net.training_losses(torch.randn(2, net.config.in_channels, net.config.input_size,
                                        net.config.input_size), torch.tensor([0, 1]))
    assert (methods.edm_loss, methods.precondition, step_module.record_function) == originals
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules())


def test_occupancy_follows_the_limits() -> None:
    # 47 registers -> 6 x 256 per warp -> 42 warps -> 5 blocks of 8 warps: 40/64
    occ = profile.occupancy(90, registers=47, shared_bytes=32, num_warps=8)
    assert occ == {"blocks_per_sm": 5, "warps_per_sm": 40, "occupancy": 40 / 64,
                   "limited_by": "registers"}
    # 100 KiB of shared memory: one block per SM on sm_80 (164 KiB), two on sm_90 (228 KiB)
    assert profile.occupancy(80, 32, 100 * 1024, 4)["blocks_per_sm"] == 1
    assert profile.occupancy(90, 32, 100 * 1024, 4)["limited_by"] == "shared_memory"
    assert profile.occupancy(90, 32, 100 * 1024, 4)["blocks_per_sm"] == 2
    # few registers, no shared memory: the warp limit
    assert profile.occupancy(80, 16, 0, 4) == {"blocks_per_sm": 16, "warps_per_sm": 64,
                                               "occupancy": 1.0, "limited_by": "warps"}


@pytest.mark.timeout(300)
def test_static_report_for_one_kernel(tmp_path) -> None:
    rc = cli.main(["profile", "--static", "--kernels", "tokens.gather.i32",
                   "--out-dir", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "static.json").read_text())["kernels"]
    assert {(r["name"], r["capability"]) for r in rows} >= {
        ("tokens.gather.i32", 80), ("tokens.gather.i32", 90), ("tokens.gather.i32.fp32", 90)}
    for r in rows:
        assert "error" not in r, r
        assert r["registers"] > 0 and r["spill_bytes"] == 0
        assert 0 < r["occupancy"] <= 1 and r["blocks_per_sm"] >= 1
        assert r["limited_by"] in {"warps", "blocks", "registers", "shared_memory"}
