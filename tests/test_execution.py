"""Threads, precision and compile decided by measurement (train/execution.py), and what
the run does with them: the decision and its timings in the log, bf16 that learns like
fp32, and a compiled step and sampler without graph breaks."""

from __future__ import annotations

import json
import os

import pytest
import torch

import model
from train import execution as X
from train.config import ConfigError, load_config
from train.logging_utils import read_jsonl
from train.loop import train

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.toml")


def _timings(speedup: float) -> X.MatmulTimings:
    return X.MatmulTimings((4096, 128, 512), 2, fp32_ms=2.0, bf16_ms=2.0 / speedup)


def test_auto_precision_follows_the_measured_bf16_speed() -> None:
    cpu = torch.device("cpu")
    fast = X.choose_precision("auto", cpu, 128, measure=lambda w, d: _timings(2.4))
    assert fast.name == "bf16" and "2.40x" in fast.reason
    # A CPU without bf16 matrix units: bf16 is emulated, slower than fp32.
    slow = X.choose_precision("auto", cpu, 128, measure=lambda w, d: _timings(0.4))
    assert slow.name == "fp32" and "no fast bf16" in slow.reason
    assert isinstance(slow.autocast(cpu), type(X.contextlib.nullcontext()))
    assert isinstance(fast.autocast(cpu), torch.autocast)
    for forced in ("fp32", "bf16"):
        choice = X.choose_precision(forced, cpu, 128, measure=lambda w, d: pytest.fail("timed"))
        assert choice.name == forced and choice.timings is None
    cuda = X.choose_precision("auto", torch.device("cuda"), 128,
                              measure=lambda w, d: pytest.fail("CUDA is not timed"))
    assert cuda.name == "bf16"  # unchanged on CUDA
    record = fast.record()
    assert record["matmul"]["bf16_speedup"] == pytest.approx(2.4)
    json.dumps(record)


def test_real_matmul_probe_is_quick_and_positive() -> None:
    t = X.time_matmuls(64, torch.device("cpu"), rows=256, reps=2)
    assert t.shape == (256, 64, 256) and t.fp32_ms > 0 and t.bf16_ms and t.bf16_ms > 0


def test_compile_auto_repays_long_cpu_runs_only() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert X.choose_compile("auto", cpu, X.COMPILE_MIN_STEPS).on
    assert not X.choose_compile("auto", cpu, X.COMPILE_MIN_STEPS - 1).on
    assert not X.choose_compile("auto", cuda, 10**6).on  # CUDA unchanged: eager by default
    assert X.choose_compile(True, cpu, 1).on and X.choose_compile("on", cuda, 1).on
    assert not X.choose_compile(False, cpu, 10**6).on and not X.choose_compile("off", cpu, 9).on


def test_config_reads_compile_modes_and_old_booleans(tmp_path) -> None:
    for raw, mode in (("'auto'", "auto"), ("'on'", "on"), ("true", "on"), ("false", "off")):
        assert load_config(CONFIG, [f"run.compile={raw}"]).run.compile == mode
    with pytest.raises(ConfigError, match="run.compile"):
        load_config(CONFIG, ["run.compile='sometimes'"])
    with pytest.raises(ConfigError, match="run.threads"):
        load_config(CONFIG, ["run.threads=-1"])


def test_threads_auto_never_adds_threads_and_gives_up_cores_only_for_a_clear_gain(
        monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    busy = X.choose_threads(0, 128, cpu, measure=lambda n: {4: 9.0, 2: 5.0, 1: 6.0}[n])
    assert busy.threads == 2 and busy.timings_ms == {4: 9.0, 2: 5.0, 1: 6.0}
    noise = X.choose_threads(0, 128, cpu, measure=lambda n: {4: 5.0, 2: 4.8, 1: 9.0}[n])
    assert noise.threads == 4  # 4% is noise, not a reason to give up cores
    assert X.choose_threads(3, 128, cpu, measure=lambda n: pytest.fail()).threads == 3
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert X.choose_threads(0, 128, cpu, measure=lambda n: pytest.fail()).threads == 1


def _config(run_dir, *sets: str):
    return load_config(CONFIG, [
        "model.overrides={patch_size=8}", "schedule.batch_size=32", "schedule.log_every=10",
        "schedule.ckpt_every=0", "schedule.sample_steps=2", "schedule.sample_per_class=1",
        "run.progress_bar=false", "run.tensorboard=false", f"run.dir={json.dumps(str(run_dir))}",
        *sets])


def test_a_cpu_without_fast_bf16_keeps_todays_fp32_eager_path(tmp_path, monkeypatch) -> None:
    """Forced to measure no bf16 gain, auto trains exactly as run.precision='fp32' with
    run.compile='off' does (a short run), and says why in metrics.jsonl."""
    monkeypatch.setattr(X, "time_matmuls", lambda width, device, **kw: _timings(0.5))
    auto = train(_config(tmp_path / "auto", "schedule.total_steps=3"))
    old = train(_config(tmp_path / "old", "schedule.total_steps=3", "run.precision='fp32'",
                        "run.compile='off'"))
    (start,) = [r for r in read_jsonl(auto.metrics) if r["event"] == "start"]
    assert start["execution"]["precision"]["precision"] == "fp32"
    assert start["execution"]["precision"]["matmul"]["bf16_speedup"] == pytest.approx(0.5)
    assert start["execution"]["compile"]["compile"] is False
    a, b = (torch.load(r.checkpoint, weights_only=False)["model"] for r in (auto, old))
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


@pytest.mark.timeout(300)
def test_bf16_learns_like_fp32(tmp_path) -> None:
    """SD-DiT-tiny, 200 steps from the same seed in fp32 and in bf16 autocast: the
    10-step mean losses agree within 4% everywhere and within 2% over the last 50 steps,
    and both runs learned (the loss fell by over 35%)."""
    curves = {}
    for precision in ("fp32", "bf16"):
        result = train(_config(tmp_path / precision, "schedule.total_steps=200",
                               f"run.precision='{precision}'", "run.compile='off'"))
        rows = read_jsonl(result.metrics)
        (start,) = [r for r in rows if r["event"] == "start"]
        assert start["execution"]["precision"]["precision"] == precision
        curves[precision] = torch.tensor([r["loss"] for r in rows if r["event"] == "train"])
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert len(fp32) == len(bf16) == 20
    assert fp32[-5:].mean() < 0.65 * fp32[0] and bf16[-5:].mean() < 0.65 * bf16[0]
    relative = ((bf16 - fp32).abs() / fp32).max().item()
    assert relative < 0.04, f"10-step means differ by up to {100 * relative:.1f}%"
    tail = abs(bf16[-5:].mean() / fp32[-5:].mean() - 1).item()
    assert tail < 0.02, f"last 50 steps differ by {100 * tail:.1f}%"


@pytest.mark.parametrize("name", ["SD-DiT-tiny", "DiT-tiny", "MaskDiT-tiny", "MDT-tiny"])
@pytest.mark.parametrize("use_kernels", [False, True])
def test_the_training_loss_traces_as_one_graph(name: str, use_kernels: bool) -> None:
    """What run.compile compiles (the loss module, under bf16 autocast) has no graph break:
    masking gather/scatter, attention "auto", and the custom ops when kernels are on."""
    torch._dynamo.reset()
    net = model.build(name, input_size=16, patch_size=4, use_kernels=use_kernels)
    x0, y = torch.randn(4, 1, 16, 16), torch.randint(0, 10, (4,))

    def loss(x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net.training_losses(x0, y)["loss"]

    explained = torch._dynamo.explain(loss)(x0, y)
    if name.startswith("MDT"):
        # MDT draws its masked pass's ratio on the host each step (model/mdt.py
        # sample_num_kept): that draw is the only reason it breaks.
        reasons = {str(r.user_stack[-1].lineno) + r.reason.splitlines()[0]
                   for r in explained.break_reasons}
        assert len(reasons) == 1 and "disable" in reasons.pop()
    else:
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1
    torch._dynamo.reset()


def test_accelerated_sampler_matches_the_net_and_pads_a_last_partial_batch() -> None:
    """The sampling view: fp32 eager equals net.denoise exactly; bf16 stays close; the
    compiled view pads a smaller batch to its graph's batch and cuts it back (one graph);
    the ODE state the sampler holds stays float64."""
    torch.manual_seed(0)
    net = model.build("DiT-tiny", input_size=16, patch_size=4).eval()
    for p in net.parameters():  # away from the zero init, so outputs depend on the weights
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64)
    sigma, y = torch.tensor(2.5, dtype=torch.float64), torch.arange(6) % 10
    ref = net.denoise(x, sigma, y, 1.5)
    fp32 = X.AcceleratedDenoiser(net, X.PrecisionChoice("fp32", "test"), compiled=False)
    assert torch.equal(fp32.denoise(x, sigma, y, 1.5), ref) and ref.dtype == torch.float64
    bf16 = X.AcceleratedDenoiser(net, X.PrecisionChoice("bf16", "test"), compiled=False)
    torch.testing.assert_close(bf16.denoise(x, sigma, y, 1.5), ref, rtol=0.05, atol=0.05)
    torch._dynamo.reset()
    compiled = X.AcceleratedDenoiser(net, X.PrecisionChoice("fp32", "test"), compiled=True)
    compiled._call = torch.compile(compiled._denoise, dynamic=False, backend="eager")
    full = compiled.denoise(x, sigma, y, 1.5)
    part = compiled.denoise(x[:4], sigma / 2, y[:4], 1.5)  # padded to 6 rows, cut to 4
    torch.testing.assert_close(full, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part, net.denoise(x[:4], sigma / 2, y[:4], 1.5), rtol=1e-5,
                               atol=1e-5)
    assert part.shape == (4, 1, 16, 16) and compiled._batch == 6
    samples = model.edm_sample(compiled, y[:4], seeds=[0, 1, 2, 3], num_steps=3)
    assert samples.shape == (4, 1, 16, 16) and torch.isfinite(samples).all()
    torch._dynamo.reset()
