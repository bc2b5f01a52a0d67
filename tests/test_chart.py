"""The chart pipeline end to end at a toy size: every registered method trained for 4
steps (checkpoints at 2 and 4) plus a 2-point SD-DiT mask sweep, FID/precision/recall
of 8 samples at each checkpoint, every file and field checked; an interrupted chart
continues where it stopped. The models are the tiny presets shrunk further (width 32,
4 blocks, patch 8) and the FID network is a cheap stand-in with the Inception contract
([N, 3, 299, 299] -> [N, 2048]), so the real network's cost (~7 images/s here) stays out."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import metrics
import model
from bench import chart, chart_run

TOY = ("schedule.batch_size=8", "optim.warmup_steps=1", "schedule.log_every=1",
       "run.progress_bar=false",
       "model.overrides={patch_size=8, hidden_size=32, depth=4, num_heads=2, "
       "head_hidden_dim=32, head_bottleneck_dim=16, n_prototypes=32}")
POINT_FIELDS = {
    "schema", "scale", "method", "run", "sweep", "seed", "step", "total_steps", "config",
    "config_hash", "batch_size", "model", "params", "train_gflops_per_image",
    "infer_gflops_per_image", "encoder_patches", "tokens", "mask_ratio", "patch_size",
    "steps_per_s", "images_per_s", "train_seconds", "rate_windows", "fid", "precision",
    "recall", "fid_samples", "fid_method", "sampler", "reference", "network", "eval_seconds",
    "device", "threads", "versions", "commit", "commit_dirty", "load_average", "created",
}
PICTURES = ("fig3_speed_vs_fid", "fig4_fid_vs_steps", "fig5_fid_vs_mask_ratio", "samples")


def stub_network() -> metrics.InceptionNetwork:
    torch.manual_seed(0)
    module = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(192, 2048), nn.ReLU())
    return metrics.InceptionNetwork(module.eval(), "stub", "0" * 64, "stub", torch.device("cpu"))


def toy_args(tmp_path: Path, **changes) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    chart.add_chart_arguments(parser)
    argv = ["--steps", "2,4", "--fid-samples", "8", "--mask-ratios", "0,0.2", "--seeds", "0",
            "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"),
            "--reference", "animal-mnist:test:16", "--cache-dir", str(tmp_path / "cache"),
            "--sampler-steps", "2", "--fid-batch", "8", "--no-progress"]
    for item in TOY:
        argv += ["--set", item]
    args = parser.parse_args(argv)
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def check_point(record: dict) -> None:
    assert set(record) >= POINT_FIELDS, sorted(POINT_FIELDS - set(record))
    assert record["method"] in model.METHODS and record["step"] in (2, 4)
    assert math.isfinite(record["fid"]) and record["fid"] > 0
    assert 0.0 <= record["precision"] <= 1.0 and 0.0 <= record["recall"] <= 1.0
    assert record["fid_samples"] == 8 and record["sampler"]["num_steps"] == 2
    assert record["steps_per_s"] > 0 and record["images_per_s"] == pytest.approx(
        8 * record["steps_per_s"])
    assert record["train_seconds"] > 0 and record["rate_windows"] >= 1
    cfg = model.make_config(record["model"], patch_size=8, hidden_size=32, depth=4, num_heads=2,
                            head_hidden_dim=32, head_bottleneck_dim=16, n_prototypes=32,
                            mask_ratio=record["mask_ratio"])
    assert record["encoder_patches"] == model.encoder_patches(cfg) and record["tokens"] == 16
    assert record["train_gflops_per_image"] == pytest.approx(
        model.flops_per_image(cfg, train=True) / 1e9)
    assert len(record["config_hash"]) == 12 and record["commit"]
    assert record["versions"]["torch"] == torch.__version__ and record["device"] == "cpu"
    assert set(record["load_average"]) == {"train_start", "eval_start", "eval_end"}


def check_outputs(out: Path, work: Path) -> dict:
    summary = json.loads((out / "chart.json").read_text())
    points = sorted((out / "points").glob("*.json"))
    # Every method x 2 steps, plus the mask-0 sweep run (mask 0.2 is SD-DiT's own run).
    assert len(points) == len(model.METHODS) * 2 + 1 and summary["complete"]
    assert [f"points/{p.name}" for p in points] == summary["points"]
    for path in points:
        check_point(json.loads(path.read_text()))
    assert summary["methods"] == list(model.METHODS) and summary["final_step"] == 4
    for method, rows in summary["curves"].items():
        assert [r["step"] for r in rows] == [2, 4], method
        assert rows[-1]["fid"]["n"] == 1 and rows[-1]["fid"]["std"] is None
    assert [r["mask_ratio"] for r in summary["mask_sweep"]] == [0.0, 0.2]
    assert summary["mask_sweep"][1]["fid"] == summary["final"]["SD-DiT"]["fid"]
    verdict = summary["verdict"]
    assert set(verdict["final"]["fid"]) == set(model.METHODS)
    assert isinstance(verdict["final"]["paper_order_holds"], bool)
    pairs = verdict["final"]["paper_pairs_hold"]
    assert set(pairs) == {"SD-DiT < MaskDiT", "SD-DiT < DiT", "MaskDiT < DiT"}
    fid = verdict["final"]["fid"]
    assert pairs["SD-DiT < DiT"] == (fid["SD-DiT"] < fid["DiT"])
    assert verdict["best_mask_ratio"] in (0.0, 0.2)
    for stem in PICTURES:
        for ext in ("png", "svg"):
            picture = out / f"{stem}.{ext}"
            assert picture.is_file() and picture.stat().st_size > 1000, picture
            assert f"{stem}.{ext}" in summary["pictures"]
    assert summary["run_configs"] == sorted(f"configs/{p.name}" for p in
                                            (out / "configs").glob("*.json"))
    assert len(summary["run_configs"]) == len(model.METHODS) + 1  # the methods, mask-0 sweep
    for name in summary["run_configs"]:
        config = json.loads((out / name).read_text())
        assert config["run"]["seed"] == 0 and config["schedule"]["total_steps"] == 4
    assert not list(out.rglob("*.pt")), "checkpoints must not land in the results folder"
    assert not work.exists() or not list(work.rglob("*.pt")), "checkpoints are cleaned up"
    return summary


@pytest.mark.timeout(240)
def test_chart_runs_end_to_end_and_resumes_after_an_interruption(tmp_path, monkeypatch):
    settings = chart.settings_from_args(toy_args(tmp_path))
    real_evaluate, calls = chart_run.Evaluator.evaluate, []

    def interrupted(self, *args, **kwargs):
        calls.append(args[1])
        if len(calls) == len(model.METHODS) + 1:  # the first evaluation at step 4
            raise KeyboardInterrupt  # as if stopped by the user in the middle of the plan
        return real_evaluate(self, *args, **kwargs)

    monkeypatch.setattr(chart_run.Evaluator, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        chart.run_chart_plan(settings, network=stub_network())
    first = sorted((tmp_path / "out" / "points").glob("*.json"))
    assert len(first) == len(model.METHODS)  # every method at step 2
    stamps = {p: p.stat().st_mtime_ns for p in first}

    monkeypatch.setattr(chart_run.Evaluator, "evaluate", real_evaluate)
    trained = []
    real_train_to = chart_run.train_to
    monkeypatch.setattr(chart_run, "train_to",
                        lambda cfg, step: trained.append((cfg.run.dir, step)) or
                        real_train_to(cfg, step))
    chart.run_chart_plan(settings, network=stub_network())
    assert {p: p.stat().st_mtime_ns for p in first} == stamps  # finished points kept
    # Every method run to step 4 (the first already there, the others from their step-2
    # checkpoints), plus the mask-0 sweep run.
    assert len(trained) == len(model.METHODS) + 1
    check_outputs(tmp_path / "out", tmp_path / "work")


def test_throughput_windows_drop_warmup_and_redone_steps(tmp_path):
    log = tmp_path / "metrics.jsonl"
    records = [{"event": "start", "step": 0}] + [
        {"event": "train", "step": s, "steps_per_s": r} for s, r in ((10, 1.0), (20, 4.0),
                                                                     (30, 5.0), (40, 6.0))
    ] + [{"event": "start", "step": 20}, {"event": "train", "step": 30, "steps_per_s": 2.0},
         {"event": "train", "step": 40, "steps_per_s": 3.0}]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    # Kept: (0-10 first, 1.0), (10-20, 4.0), then after the resume at 20: (20-30 first, 2.0),
    # (30-40, 3.0). Steady windows leave out each invocation's first.
    got = chart_run.throughput_from_log(str(log), 40, batch=8)
    assert got["steps_per_s"] == pytest.approx(3.5) and got["rate_windows"] == 2
    assert got["images_per_s"] == pytest.approx(28.0)
    assert got["train_seconds"] == pytest.approx(10 / 1 + 10 / 4 + 10 / 2 + 10 / 3)
    assert chart_run.throughput_from_log(str(log), 20, batch=8)["steps_per_s"] == 4.0


@pytest.mark.parametrize(("change", "message"), [
    ({"methods": "SD-DiT,Nope"}, "--methods"),
    ({"steps": "4,2"}, "--steps"),
    ({"fid_samples": 2}, "--fid-samples"),
    ({"mask_ratios": "0.2,1.0"}, "--mask-ratios"),
    ({"seeds": "0,0"}, "--seeds"),
    ({"scale": "paper", "reference": None}, "--reference"),
])
def test_bad_arguments_fail_before_any_work(tmp_path, capsys, change, message):
    args = toy_args(tmp_path, **change)
    assert chart.run_chart(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_checkpoints_can_never_be_written_into_the_results_folder(tmp_path):
    args = toy_args(tmp_path, work_dir=str(tmp_path / "out" / "runs"))
    with pytest.raises(chart.ChartError, match="--work-dir"):
        chart.settings_from_args(args)


def test_plan_covers_every_registered_method_and_shares_the_sd_dit_run(tmp_path):
    plan = chart.build_plan(chart.settings_from_args(toy_args(tmp_path, mask_ratios=None)))
    keys = [spec.key for spec in plan]
    assert len(keys) == len(set(keys))
    assert [s.method for s in plan if not s.sweep] == list(model.METHODS)
    sweep = sorted(s.mask_ratio for s in plan if s.method == "SD-DiT")
    assert sweep == [0.0, 0.2, 0.4, 0.6]
    assert all(s.steps == (4,) for s in plan if s.sweep)
    paper = chart.build_plan(chart.Settings(
        "paper", "default", tuple(model.METHODS), (100_000, 400_000), 50_000, (0.2,), (0,),
        str(tmp_path / "o"), str(tmp_path / "w"), "ref.npz", 18, 1.0, 250))
    names = {s.model_name for s in paper}
    assert {f"{m}-XL/2" for m in model.METHODS} | {"SD-DiT-S/2"} == names
    assert all(os.path.isfile(s.config) for s in paper)


def test_throughput_only_times_every_method_without_fid(tmp_path, capsys):
    assert chart.run_chart(toy_args(tmp_path, throughput_only=True)) == 0
    record = json.loads((tmp_path / "out" / "throughput.json").read_text())
    assert [r["method"] for r in record["results"]] == list(model.METHODS)
    for row in record["results"]:
        assert row["steps_per_s"] > 0 and row["batch_per_device"] == 8 and row["tokens"] == 16
        assert row["images_per_s"] == pytest.approx(8 * row["steps_per_s"])
    assert not (tmp_path / "work").exists()
    assert "steps/s" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_paper_scale_on_cpu_says_so_and_runs_nothing(tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    ref.write_bytes(b"")
    args = toy_args(tmp_path, scale="paper", reference=str(ref), throughput_only=True, set=None)
    assert chart.run_chart(args) == 0
    assert "no CUDA device" in capsys.readouterr().out
    args = toy_args(tmp_path, scale="paper", reference=str(ref), set=None)
    assert chart.run_chart(args) == 2
    assert "--scale small" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_long_plan_rows_seeds_and_shared_runs(tmp_path):
    """The long plan: each row's seeds, MaskDiT's fine-tune row sharing its pre-training
    run with the no-fine-tune row, ablation rows in runs of their own, no mask sweep."""
    args = toy_args(tmp_path, plan="long", seeds=None, steps=None, fid_samples=None,
                    mask_ratios=None)
    settings = chart.settings_from_args(args)
    assert settings.steps == (1000, 2000) and settings.fid_samples == 1000
    assert settings.seeds == (0, 1, 2) and settings.mask_ratios == ()
    plan = chart.build_plan(settings)
    seeds = {}
    for spec in plan:
        seeds.setdefault(spec.row, []).append(spec.seed)
    assert seeds == {"DiT": [0, 1, 2], "MaskDiT": [0, 1, 2], "MaskDiT (no fine-tune)": [0, 1, 2],
                     "SD-DiT": [0, 1, 2], "SD-DiT (lambda_dis=0)": [0, 1, 2], "MDT": [0],
                     "SD-DiT (teacher at student sigma)": [0]}
    by_row = {(s.row, s.seed): s for s in plan}
    ft, plain = by_row[("MaskDiT", 1)], by_row[("MaskDiT (no fine-tune)", 1)]
    assert ft.key == plain.key and ft.point_key != plain.point_key  # one pre-training run
    assert [ft.finetune_steps(s) for s in settings.steps] == [50, 100]
    # Runs are planned for 3,000 steps (their schedules) and scored at 1k and 2k.
    assert {s.planned_steps for s in plan} == {3000}
    assert chart.run_config(settings, plain).schedule.total_steps == 3000
    ablation = by_row[("SD-DiT (lambda_dis=0)", 0)]
    assert ablation.key != by_row[("SD-DiT", 0)].key
    assert chart.run_config(settings, ablation).model.overrides["lambda_dis"] == 0.0
    branch = chart_run.finetune_config(settings, ft, 2000)
    assert (branch.schedule.total_steps, branch.schedule.unmasked_finetune_steps) == (2100, 100)
    assert branch.run.dir != chart.run_config(settings, ft).run.dir


@pytest.mark.timeout(240)
def test_finetune_row_scores_branches_and_the_clock_is_back_to_back(tmp_path):
    """MaskDiT as published at toy size: each checkpoint continued unmasked in a branch
    (the MAE term is 0 there), scored at S + F steps; the no-fine-tune row is the
    pre-training run itself. With throughput.json the wall-clock axis and the pairwise
    comparisons use the back-to-back step rates."""
    args = toy_args(tmp_path, plan="long", seeds="0,1", steps="4,8", methods="MaskDiT",
                    mask_ratios=None, keep_checkpoints=True)
    settings = chart.settings_from_args(args)
    chart.run_chart_plan(settings, network=stub_network())
    out = tmp_path / "out"
    branch_log = tmp_path / "work" / "MaskDiT-tiny_r0.50_s1_ft0000008" / "metrics.jsonl"
    rows = [json.loads(line) for line in branch_log.read_text().splitlines()]
    assert [r["loss/mae"] for r in rows if r["event"] == "train"] == [0.0]  # unmasked
    points = {p.name: json.loads(p.read_text()) for p in (out / "points").glob("*.json")}
    assert len(points) == 8  # 2 rows x 2 seeds x 2 checkpoints
    ft = points["MaskDiT-tiny_r0.50_s1_ft_step0000008.json"]
    assert (ft["row"], ft["finetune_steps"], ft["trained_steps"]) == ("MaskDiT", 1, 9)
    plain = points["MaskDiT-tiny_r0.50_s1_step0000008.json"]
    assert (plain["row"], plain["trained_steps"]) == ("MaskDiT (no fine-tune)", 8)
    assert ft["train_seconds"] > plain["train_seconds"] and ft["fid"] != plain["fid"]
    rates = {"results": [
        {"method": "MaskDiT", "row": "MaskDiT", "sets": [], "steps_per_s": 4.0},
        {"method": "MaskDiT", "row": "MaskDiT (fine-tune stage)",
         "sets": ["model.overrides.mask_ratio=0.0"], "steps_per_s": 2.0}]}
    (out / "throughput.json").write_text(json.dumps(rates))
    chart.run_chart_plan(settings, network=stub_network())  # nothing left: redraws
    summary = json.loads((out / "chart.json").read_text())
    last = summary["curves"]["MaskDiT"][-1]
    assert last["wall_seconds"]["mean"] == pytest.approx(8 / 4.0 + 1 / 2.0)
    assert summary["curves"]["MaskDiT (no fine-tune)"][-1]["wall_seconds"]["mean"] == 2.0
    (pair,) = summary["comparisons"]
    assert (pair["a"], pair["b"]) == ("MaskDiT", "MaskDiT (no fine-tune)")
    assert [row["step"] for row in pair["by_step"]] == [4, 8]
    assert "| MaskDiT | 2 | 4.00" in (out / "table.md").read_text()


def test_one_precision_is_decided_for_every_run_of_the_chart(tmp_path, monkeypatch):
    """run.precision "auto" is measured once for the whole chart and pinned in every run's
    config, so no run decides on its own at a busy moment; a set precision is kept."""
    from train import execution

    calls = []

    def fake(width, device, **kw):
        calls.append(width)
        return execution.MatmulTimings((4096, width, 4 * width), 1, 2.0, 1.0)

    monkeypatch.setattr(execution, "time_matmuls", fake)
    settings = chart.settings_from_args(toy_args(tmp_path))
    pinned, reason = chart.pin_precision(settings)
    assert calls == [32] and reason.startswith("bf16")
    assert {chart.run_config(pinned, spec).run.precision
            for spec in chart.build_plan(pinned)} == {"bf16"}
    forced = chart.settings_from_args(toy_args(tmp_path, set=[*TOY, "run.precision='fp32'"]))
    assert chart.pin_precision(forced) == (forced, None) and len(calls) == 1


@pytest.mark.timeout(60)
def test_a_stopped_chart_says_how_to_continue(tmp_path, monkeypatch, capsys):
    """SIGTERM during a chart's training: one line naming the saved checkpoint and the way
    on, exit 128 + signal, no traceback."""
    from train.loop import TrainingInterrupted

    def stopped(settings, network=None):
        raise TrainingInterrupted(15, str(tmp_path / "work" / "run" / "ckpt-00000003.pt"))

    monkeypatch.setattr(chart, "run_chart_plan", stopped)
    assert chart.run_chart(toy_args(tmp_path)) == 128 + 15
    err = capsys.readouterr().err
    assert "stopped by signal 15" in err and "ckpt-00000003.pt" in err and "rerun" in err
