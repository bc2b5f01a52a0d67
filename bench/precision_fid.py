"""`sddit bench precision`: does bf16 buy its speed with quality? The demo recipe
(configs/tiny.toml) trained to the same step in fp32 and in bf16 autocast, from each seed,
and FID of the same samples against the held-out animal-mnist split.

    sddit bench precision --steps 1100 --seeds 0,1 --fid-samples 500

Each (precision, seed) run trains with everything else equal (data order, noise, masks,
schedules; compilation off in both, so the only difference is the dtype) and is scored
with the same sampler seeds and reference, sampling in its own precision (the path a user
runs); the bf16 run is also scored with fp32 sampling, which separates what bf16 training
did from what bf16 sampling does. The JSON records each FID and training time, the
bf16-fp32 difference per seed and the seed-to-seed spread in each precision, the yardstick
the difference is read against.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

from bench._harness import environment, module_main, write_json

PRECISIONS = ("fp32", "bf16")


def add_precision_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=1100, help="training steps per run (default "
                   "1100, the old demo's length)")
    p.add_argument("--seeds", default="0,1", help="comma list of training seeds (default 0,1)")
    p.add_argument("--fid-samples", type=int, default=500, help="samples per FID (default 500)")
    p.add_argument("--fid-steps", type=int, default=18, help="Heun steps (default 18)")
    p.add_argument("--reference", default="animal-mnist:test",
                   help="FID reference (default: the 1,000 held-out animal-mnist images)")
    p.add_argument("--cache-dir", default=None, help="FID reference statistics cache")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="config override for every run (repeatable)")
    p.add_argument("--config", default=os.path.join("configs", "tiny.toml"))
    p.add_argument("--work", default=os.path.join("runs", "precision-fid"),
                   help="run folders (a finished run is reused, not retrained)")
    p.add_argument("--out", default=os.path.join("bench-out", "precision_fid.json"))


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be a comma list of integers, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise ValueError(f"--seeds must name at least one seed >= 0, got {text!r}")
    return seeds


def train_and_score(args: argparse.Namespace, precision: str, seed: int) -> dict[str, Any]:
    """One run of the recipe in `precision` from `seed`, then its FID (fp32 sampling)."""
    from bench.chart_run import throughput_from_log
    from metrics.evaluate import evaluate_net
    from train.checkpoint import latest_checkpoint, load_sampling_model
    from train.config import load_config
    from train.execution import accelerated_denoiser
    from train.loop import train

    run_dir = os.path.join(args.work, f"{precision}-seed{seed}")
    cfg = load_config(args.config, [
        f"run.dir={json.dumps(run_dir)}", f"run.seed={seed}", f"run.precision='{precision}'",
        "run.compile='off'", f"schedule.total_steps={args.steps}", "schedule.ckpt_every=0",
        *args.overrides])
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None or not checkpoint.endswith(f"{args.steps:08d}.pt"):
        checkpoint = train(cfg, resume=checkpoint is not None).checkpoint
    # From the run's own log, so a finished run that is reused reports what it took, not 0.
    trained_s = throughput_from_log(os.path.join(run_dir, "metrics.jsonl"), args.steps,
                                    cfg.schedule.batch_size)["train_seconds"]
    net, meta = load_sampling_model(checkpoint, "cpu")
    row: dict[str, Any] = {"precision": precision, "seed": seed, "step": meta["step"],
                           "train_seconds": trained_s, "checkpoint": checkpoint}
    for sampling in [precision] + (["fp32"] if precision != "fp32" else []):
        scores = evaluate_net(accelerated_denoiser(net, sampling, "off"), args.fid_samples,
                              reference=args.reference, num_steps=args.fid_steps,
                              progress=True, fid_method="features", cache_dir=args.cache_dir)
        key = "fid" if sampling == precision else "fid_fp32_sampling"
        row[key] = scores["fid"]
        if sampling == precision:
            row["pr_precision"], row["pr_recall"] = scores["precision"], scores["recall"]
    return row


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """fp32 - bf16 per seed, and each precision's seed spread (std over seeds)."""
    by = {(r["precision"], r["seed"]): r["fid"] for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    diffs = {s: by[("bf16", s)] - by[("fp32", s)] for s in seeds
             if ("bf16", s) in by and ("fp32", s) in by}
    spread = {}
    for p in PRECISIONS:
        values = [by[(p, s)] for s in seeds if (p, s) in by]
        spread[p] = statistics.stdev(values) if len(values) > 1 else None
    return {"bf16_minus_fp32_by_seed": diffs, "seed_std": spread}


def run_precision(args: argparse.Namespace) -> int:
    try:
        seeds = _seeds(args.seeds)
        if args.steps < 1 or args.fid_samples < 4 or args.fid_steps < 1:
            raise ValueError("--steps and --fid-steps must be >= 1, --fid-samples >= 4")
    except ValueError as exc:
        print(f"sddit bench precision: {exc}", file=sys.stderr)
        return 2
    payload: dict[str, Any] = {"env": environment(), "steps": args.steps,
                               "fid_samples": args.fid_samples, "fid_steps": args.fid_steps,
                               "config": args.config, "results": []}
    for seed in seeds:
        for precision in PRECISIONS:
            row = train_and_score(args, precision, seed)
            payload["results"].append(row)
            payload["summary"] = summarise(payload["results"])
            write_json(args.out, payload)
            print(f"{precision} seed {seed}: FID({args.fid_samples}) {row['fid']:.2f} at step "
                  f"{row['step']} (trained in {row['train_seconds']:.0f} s)", flush=True)
    print(json.dumps(payload["summary"], indent=2))
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return module_main("python -m bench.precision_fid", __doc__, add_precision_arguments,
                       run_precision, argv)


if __name__ == "__main__":
    sys.exit(main())
