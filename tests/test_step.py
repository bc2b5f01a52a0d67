"""`sddit bench step` on CPU: the tiny preset through the real TrainStep, every field."""

import json
import subprocess
import sys

import pytest
import torch

from bench import cli, step


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("step") / "step.json"
    rc = cli.main(["bench", "step", "--model", "SD-DiT-tiny", "--device", "cpu", "--paths",
                   "eager", "--batch", "4", "--steps", "3", "--warmup", "1",
                   "--profile-steps", "1", "--out", str(out)])
    assert rc == 0
    return json.loads(out.read_text())


def test_report_is_labelled_cpu_and_complete(report: dict) -> None:
    assert report["status"] == "complete"
    assert report["label"].startswith("CPU")
    assert report["env"]["device"] == "cpu" and report["env"]["commit"]
    assert report["measured_matmul_tflops"] > 0 and report["datasheet_bf16_tflops"] is None
    from model import METHODS

    names = [m["model"] for m in report["methods"]]
    assert names == [f"{method}-tiny" for method in METHODS]
    sd = report["methods"][0]
    assert sd["params_m"] > 0 and sd["teacher_params_m"] > 0  # SD-DiT's teacher, apart
    assert all(m["train_gflops"] > m["forward_gflops"] > 0 for m in report["methods"])


def test_path_row_has_throughput_spread_memory_mfu_and_shares(report: dict) -> None:
    (row,) = report["results"]
    assert row["path"] == "eager" and row["timed_steps"] == 3
    assert row["min_step_ms"] <= row["p10_step_ms"] <= row["median_step_ms"]
    assert row["median_step_ms"] <= row["p90_step_ms"] <= row["max_step_ms"]
    assert row["images_per_s"] == pytest.approx(4 * row["steps_per_s"])
    assert row["achieved_tflops"] == pytest.approx(
        row["train_gflops_per_image"] * row["images_per_s"] / 1e3)
    assert row["mfu_measured_matmul"] > 0 and row["mfu_datasheet"] is None
    assert row["peak_rss_gib_process"] > 0
    assert row["kernels_backend"] == "none"
    assert row["optimizer"].startswith("torch AdamW") and row["cuda_graphs"] is False
    shares = row["profile"]["shares"]
    assert set(shares) == {"attention", "gemm", "fused", "optimizer", "ema", "other"}
    assert sum(shares.values()) == pytest.approx(1.0)
    for kind in ("attention", "gemm", "optimizer", "ema"):
        assert shares[kind] > 0, kind
    phases = {p["phase"] for p in row["profile"]["phases"]}
    assert {"forward", "backward", "grad_norm", "optimizer", "teacher_ema",
            "sampling_ema"} <= phases


def test_rig_is_the_loops_train_step() -> None:
    """What is timed updates the weights, the teacher and the sampling EMA in one call."""
    from train.step import TrainStep

    rig = step.build_rig("SD-DiT-tiny", "eager", 2, torch.device("cpu"))
    assert isinstance(rig.step_fn, TrainStep)
    def flat(module: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()

    parts = {"student": rig.net.backbone, "teacher": rig.net.method.teacher,
             "ema": rig.step_fn.ema.module}
    before = {name: flat(m) for name, m in parts.items()}
    stats = rig.run(0)
    assert stats[-1].item() == 1.0  # the step was applied
    for name, module in parts.items():
        assert not torch.equal(before[name], flat(module)), name


@pytest.mark.parametrize("argv, message", [
    (["--model", "SD-DiT-XL/2", "--device", "cpu"], "only the *-tiny presets"),
    (["--paths", "eager,nope", "--device", "cpu"], "--paths"),
    (["--model", "SD-DiT-Q/3", "--device", "cpu"], "SD-DiT-Q/3"),
    (["--paths", "eager,kernels+graphs", "--device", "cpu"], "CUDA graphs need a CUDA device"),
])
def test_bad_arguments_fail_before_any_work(argv: list[str], message: str, tmp_path) -> None:
    out = tmp_path / "never.json"
    proc = subprocess.run([sys.executable, "-m", "bench.step", *argv, "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not out.exists()


def test_plugs_into_a_command_line_and_the_group_takes_new_entries(monkeypatch) -> None:
    """As the sddit command line wires it: add_*_parser on its subparsers, run_* as func;
    a new `sddit bench` subcommand is one BENCH_COMMANDS entry."""
    import argparse

    from bench import step as step_module

    monkeypatch.setitem(cli.BENCH_COMMANDS, "step-again",
                        (step_module.add_step_arguments, step_module.run_step, "the same, twice"))
    parser = argparse.ArgumentParser(prog="sddit")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_bench_parser(sub).set_defaults(func=cli.run_bench)
    cli.add_profile_parser(sub).set_defaults(func=cli.run_profile)
    for name in ("step", "step-again"):
        args = parser.parse_args(["bench", name, "--model", "SD-DiT-XL/2", "--device", "cpu"])
        assert args.func(args) == 2  # XL on CPU: refused before any work
    args = parser.parse_args(["profile", "--model", "SD-DiT-XL/2", "--device", "nope"])
    assert args.func(args) == 2


def test_attention_auto_decisions_are_reported_with_every_candidates_time(report: dict,
                                                                         monkeypatch) -> None:
    """The CPU step's decisions are listed with each CPU candidate's time; a CUDA decision
    is converted with each candidate's time and a failed candidate (inf) as null, so the
    JSON stays valid."""
    from model import attention

    cpu = report["attention_choices"]
    assert cpu and {c["with_backward"] for c in cpu} >= {True}
    for choice in cpu:
        assert set(choice["timings_ms"]) == {"sdpa", "sdpa_math", "math"}
        assert choice["backend"] == min(choice["timings_ms"], key=choice["timings_ms"].get)
    chooser = attention.BackendChooser(timer=lambda fn: 0.0)
    key = attention.ShapeKey(32, 205, 16, 72, "torch.bfloat16", "cuda:0", True)
    chooser.choices[key] = attention.Choice(key, "sdpa_cudnn", {
        "sdpa_flash": 1.25, "sdpa_cudnn": 0.75, "sdpa_efficient": float("inf")})
    monkeypatch.setattr(attention, "_CHOOSER", chooser)
    (row,) = step.measured_attention_choices()
    assert row == {"batch": 32, "tokens": 205, "heads": 16, "head_dim": 72,
                   "dtype": "torch.bfloat16", "with_backward": True, "backend": "sdpa_cudnn",
                   "timings_ms": {"sdpa_flash": 1.25, "sdpa_cudnn": 0.75,
                                  "sdpa_efficient": None}}
    json.dumps(row, allow_nan=False)


@pytest.mark.parametrize("fused_optimizer, expected", [
    ("off", "torch AdamW (fused)"), ("on", "one-pass Triton AdamW")])
def test_each_row_says_which_optimizer_ran(monkeypatch, fused_optimizer, expected) -> None:
    """The reference paths keep torch's optimizer and the kernel paths take the one-pass
    one where it applies ('auto': CUDA); forced here so that both builds run on CPU."""
    assert step.PATH_SPECS["eager"].fused_optimizer == "off"
    assert step.PATH_SPECS["kernels"].fused_optimizer == "auto"
    monkeypatch.setitem(step.PATH_SPECS, "kernels",
                        step.PathSpec(True, False, fused_optimizer))
    rig = step.build_rig("SD-DiT-tiny", "kernels", 2, torch.device("cpu"))
    description = rig.update_description()
    assert description["optimizer"].startswith(expected), description
    assert description["cuda_graphs"] is False
    assert rig.run(0)[-1].item() == 1.0  # and the step it describes runs
    if fused_optimizer == "off":  # the graphed step (its CPU form) is seen through
        from train.graphs import GraphedStep

        rig.step_fn = GraphedStep(rig.step_fn, capture=False)
        assert rig.update_description() == {**description, "cuda_graphs": True}
