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


def test_ranges_are_set_on_the_instances_only_and_removed_afterwards() -> None:
    """No global patching: another net built alongside stays unmarked, and after the block
    the net and the step are as they were."""
    from torch.profiler import record_function

    import model
    from model.methods import Method

    net, other = model.build("SD-DiT-tiny"), model.build("SD-DiT-tiny")
    step_fn = type("Step", (), {"phase_range": staticmethod(record_function)})()
    default = Method.phase_range
    x = torch.randn(2, net.config.in_channels, net.config.input_size, net.config.input_size)
    with profile.phase_ranges(net, step_fn, nvtx=False):
        assert net.method.phase_range is not default and other.method.phase_range is default
        assert net.backbone.x_embedder._forward_pre_hooks
        with torch.profiler.profile() as prof:
            net.training_losses(x, torch.tensor([0, 1]))
    names = {e.name for e in prof.events()}
    assert {"phase:noise", "phase:mask", "phase:losses", "phase:embed", "phase:teacher",
            "phase:student_encoder", "phase:decoder", "phase:heads"} <= names
    assert net.method.phase_range is default and "phase_range" not in vars(net.method)
    assert step_fn.phase_range is record_function
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in net.modules())
    with torch.profiler.profile() as prof:
        net.training_losses(x, torch.tensor([0, 1]))
    assert not any(e.name.startswith("phase:") for e in prof.events())


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


class _Cpu:
    def __str__(self) -> str:
        return "DeviceType.CPU"


def _event(name: str, start: float, end: float, parent=None, kernels=(), self_us=0.0):
    from types import SimpleNamespace

    return SimpleNamespace(name=name, is_async=False, device_type=_Cpu(), cpu_parent=parent,
                           time_range=SimpleNamespace(start=start, end=end),
                           kernels=[SimpleNamespace(name=k, duration=d) for k, d in kernels],
                           self_cpu_time_total=self_us)


def test_cuda_breakdown_places_kernels_by_phase_and_kind() -> None:
    """The CUDA path, on hand-made events: kernels counted by device time, named by kind,
    and backward kernels launched from the autograd thread (no phase ancestor) placed in
    the phase the caller was in at that time."""
    from bench._trace import breakdown, sdkernel_names

    fwd = _event("phase:forward", 0, 100)
    enc = _event("phase:student_encoder", 10, 60, fwd)
    lin = _event("aten::linear", 12, 20, enc)
    mm = _event("aten::addmm", 13, 19, lin, kernels=[("sm90_xmma_gemm_bf16", 30.0)])
    attn = _event("aten::_scaled_dot_product_flash_attention", 21, 30, enc,
                  kernels=[("flash_fwd_kernel", 20.0)])
    own = sorted(sdkernel_names())[0]
    fused = _event("sdkernels::adaln_modulate", 31, 40, enc, kernels=[(own, 5.0)])
    bwd = _event("phase:backward", 100, 200)
    # autograd thread: no cpu_parent chain up to phase:backward
    engine = _event("autograd::engine::evaluate_function: MmBackward0", 120, 130)
    bmm = _event("aten::mm", 121, 129, engine, kernels=[("nvjet_tst_128x256", 60.0)])
    opt = _event("phase:optimizer", 200, 220)
    adam = _event("aten::_fused_adamw_", 201, 219, opt, kernels=[("fused_adamw_kernel", 10.0)])
    ema = _event("phase:sampling_ema", 220, 230)
    lerp = _event("aten::_foreach_lerp_", 221, 229, ema, kernels=[("lerp_kernel", 5.0)])
    misc = _event("aten::add", 61, 62, fwd, kernels=[("vectorized_elementwise_kernel", 5.0)])
    events = [fwd, enc, lin, mm, attn, fused, bwd, engine, bmm, opt, adam, ema, lerp, misc]
    bd = breakdown(events, steps=1, cuda=True)
    assert bd.total_us == pytest.approx(135.0)
    assert dict(bd.by_kind) == pytest.approx({"gemm": 90.0, "attention": 20.0, "fused": 5.0,
                                              "optimizer": 10.0, "ema": 5.0, "other": 5.0})
    assert dict(bd.by_phase) == pytest.approx({"student_encoder": 55.0, "backward": 60.0,
                                               "optimizer": 10.0, "sampling_ema": 5.0,
                                               "forward": 5.0})
    assert bd.top_kernels(1)[0]["name"] == "nvjet_tst_128x256"


@pytest.mark.parametrize("name, ancestors, phase, kind", [
    ("## Call CompiledFxGraph f00 ##", ["CompiledFunction"], "forward", "fused"),  # CPU Inductor
    ("triton_per_fused_native_layer_norm_0", [], "forward", "fused"),  # CUDA Inductor
    ("aten::mm", ["## Call CompiledFxGraph f00 ##"], "forward", "gemm"),
    ("aten::copy_", ["aten::linear"], "forward", "gemm"),  # part of a linear layer
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", [], "backward", "attention"),
    ("aten::mm", [], "optimizer", "optimizer"),  # the phase wins
    ("aten::_foreach_lerp_", [], "teacher_ema", "ema"),
    ("aten::gelu", [], "forward", "other"),
])
def test_classify(name: str, ancestors: list[str], phase: str, kind: str) -> None:
    from bench._trace import classify

    assert classify(name, ancestors, phase, frozenset()) == kind
