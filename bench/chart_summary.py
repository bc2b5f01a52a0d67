"""The chart's summary: chart.json from the points (per-method curves, final points,
the mask sweep, aggregated over seeds), the verdict on the paper's ordering, and the
lines printed at the end. See bench/chart.py.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
from typing import Any

from bench.chart_plan import SCHEMA, RunSpec, Settings, method_model_name, point_path


def now_utc() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- summary


def _stat(values: list[float | None]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return {"mean": statistics.mean(vals), "std": std, "n": len(vals)}


FIELDS = ("fid", "precision", "recall", "steps_per_s", "images_per_s", "train_seconds")
FACTS = ("model", "params", "train_gflops_per_image", "encoder_patches", "tokens", "mask_ratio",
         "batch_size")


def _aggregate(points: list[dict]) -> dict[str, Any]:
    """Mean and (several seeds) standard deviation of each measured field; shared facts."""
    row: dict[str, Any] = {k: _stat([p.get(k) for p in points]) for k in FIELDS}
    row.update({k: points[0].get(k) for k in FACTS})
    row["samples_png"] = next((p["samples_png"] for p in points if p.get("samples_png")), None)
    row["seeds"] = sorted(p["seed"] for p in points)
    return row


def read_points(settings: Settings, plan: list[RunSpec]) -> dict[tuple[str, int], dict]:
    found = {}
    for spec in plan:
        for step in spec.steps:
            path = point_path(settings, spec, step)
            if os.path.isfile(path):
                with open(path) as f:
                    found[(spec.key, step)] = json.load(f)
    return found


def summarise(settings: Settings, plan: list[RunSpec], env: dict) -> dict[str, Any]:
    """chart.json: per-method curves (Fig. 4), final points (Fig. 3), the mask sweep
    (Fig. 5), aggregated over seeds, and the verdict on the paper's ordering."""
    points = read_points(settings, plan)
    curves: dict[str, list[dict]] = {}
    for method in settings.methods:
        runs = [s for s in plan if s.method == method and not s.sweep]
        for step in settings.steps:
            got = [points[(s.key, step)] for s in runs if (s.key, step) in points]
            if got:
                curves.setdefault(method, []).append({"step": step, **_aggregate(got)})
    final = settings.steps[-1]
    sweep_model = method_model_name(settings.scale, "SD-DiT", True)
    mask = []
    for ratio in settings.mask_ratios:
        got = [points[(s.key, final)] for s in plan if s.model_name == sweep_model
               and abs(s.mask_ratio - ratio) < 1e-9 and (s.key, final) in points]
        if got:
            mask.append({"mask_ratio": ratio, **_aggregate(got)})
    finals = {m: rows[-1] for m, rows in curves.items() if rows[-1]["step"] == final}
    return {
        "schema": SCHEMA, "scale": settings.scale, "created": now_utc(),
        "settings": dataclasses_asdict(settings), "environment": env,
        "fid_note": (f"FID from {settings.fid_samples} samples is biased upwards against "
                     "FID-50K; compare methods only at equal N (as here)."),
        "methods": list(curves), "final_step": final, "curves": curves, "final": finals,
        "mask_sweep": mask, "verdict": verdict(finals, mask, curves),
        "points": sorted(f"points/{os.path.basename(point_path(settings, s, st))}"
                         for s in plan for st in s.steps if (s.key, st) in points),
        "complete": len(points) == sum(len(s.steps) for s in plan),
    }


def dataclasses_asdict(settings: Settings) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(settings)


PAPER_ORDER = ("SD-DiT", "MaskDiT", "DiT")  # best (lowest FID) first, at equal steps


def verdict(finals: dict, mask: list[dict], curves: dict) -> dict[str, Any]:
    """Does the paper's ordering hold here? At the final step and at every step."""
    out: dict[str, Any] = {"paper_order": list(PAPER_ORDER), "paper_best_mask_ratio": 0.2}

    def ordered(rows: dict[str, float]) -> dict[str, Any]:
        ranking = sorted(rows, key=rows.get)
        present = [m for m in PAPER_ORDER if m in rows]
        holds = [m for m in ranking if m in PAPER_ORDER] == present if len(present) > 1 else None
        pairs = {f"{a} < {b}": rows[a] < rows[b] for i, a in enumerate(present)
                 for b in present[i + 1:]}  # each claim of the paper's ordering on its own
        return {"ranking": ranking, "fid": rows, "paper_order_holds": holds,
                "paper_pairs_hold": pairs}

    out["final"] = ordered({m: r["fid"]["mean"] for m, r in finals.items()
                            if r["fid"]["mean"] is not None})
    steps = sorted({row["step"] for rows in curves.values() for row in rows})
    out["by_step"] = {str(step): ordered({m: row["fid"]["mean"] for m, rows in curves.items()
                                          for row in rows if row["step"] == step})
                      for step in steps}
    if mask:
        best = min(mask, key=lambda r: r["fid"]["mean"])
        out["best_mask_ratio"] = best["mask_ratio"]
        out["best_mask_ratio_is_paper_0.2"] = abs(best["mask_ratio"] - 0.2) < 1e-9
    return out


def _num(stat: dict, digits: int = 2) -> str:
    if stat["mean"] is None:
        return "n/a"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" +- {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def format_summary(summary: dict) -> str:
    lines = [f"chart ({summary['scale']}): FID at step {summary['final_step']}; "
             + summary["fid_note"]]
    for method, row in summary["final"].items():
        lines.append(f"  {method:<8} FID {_num(row['fid'])}  P {_num(row['precision'], 3)}"
                     f"  R {_num(row['recall'], 3)}  {_num(row['steps_per_s'])} steps/s"
                     f"  {row['encoder_patches']} patches")
    for row in summary["mask_sweep"]:
        lines.append(f"  SD-DiT mask {row['mask_ratio']:.1f}: FID {_num(row['fid'])}")
    lines.append(f"  paper ordering holds at the final step: "
                 f"{summary['verdict']['final']['paper_order_holds']}")
    lines.append(f"  pictures: {', '.join(summary.get('pictures', []))}")
    return "\n".join(lines)
