"""`sddit bench precision` at toy size: the recipe trained in fp32 and in bf16 from each
seed, each scored in its own precision (bf16 also with fp32 sampling), the differences
and seed spreads computed from those rows, and a finished run reused, not retrained."""

from __future__ import annotations

import json

import pytest

from bench import cli

TOY = ("model.overrides={patch_size=8, hidden_size=32, depth=2, num_heads=2, "
       "head_hidden_dim=32, head_bottleneck_dim=16, n_prototypes=32}",
       "schedule.batch_size=8", "schedule.log_every=1", "run.progress_bar=false",
       "optim.warmup_steps=1")


@pytest.mark.timeout(240)
def test_precision_bench_trains_both_dtypes_and_scores_them(tmp_path):
    argv = ["bench", "precision", "--steps", "2", "--seeds", "0,1", "--fid-samples", "8",
            "--fid-steps", "2", "--reference", "animal-mnist:test:16", "--cache-dir",
            str(tmp_path / "cache"), "--work", str(tmp_path / "runs"), "--out",
            str(tmp_path / "out.json")]
    for item in TOY:
        argv += ["--set", item]
    assert cli.main(argv) == 0
    record = json.loads((tmp_path / "out.json").read_text())
    rows = {(r["precision"], r["seed"]): r for r in record["results"]}
    assert set(rows) == {(p, s) for p in ("fp32", "bf16") for s in (0, 1)}
    assert all(r["step"] == 2 and r["fid"] > 0 for r in rows.values())
    assert all("fid_fp32_sampling" in rows[("bf16", s)] for s in (0, 1))
    assert "fid_fp32_sampling" not in rows[("fp32", 0)]
    summary = record["summary"]
    for seed in (0, 1):
        assert summary["bf16_minus_fp32_by_seed"][str(seed)] == pytest.approx(
            rows[("bf16", seed)]["fid"] - rows[("fp32", seed)]["fid"])
    assert summary["seed_std"]["fp32"] > 0
    stamp = (tmp_path / "runs" / "fp32-seed0" / "metrics.jsonl").stat().st_mtime_ns
    trained = rows[("fp32", 0)]["train_seconds"]
    assert trained > 0
    assert cli.main(argv) == 0  # the finished runs are scored again, not retrained
    assert (tmp_path / "runs" / "fp32-seed0" / "metrics.jsonl").stat().st_mtime_ns == stamp
    again = json.loads((tmp_path / "out.json").read_text())["results"][0]
    assert again["train_seconds"] == pytest.approx(trained)  # from the run's log, not 0
    assert cli.main([*argv[:5], "x,1", *argv[6:]]) == 2  # a bad --seeds, before any work
