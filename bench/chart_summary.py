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

from bench.chart_plan import (
    SCHEMA,
    UNMASKED_STAGE_SET,
    RunSpec,
    Settings,
    method_model_name,
    point_path,
)


def now_utc() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- summary


def _stat(values: list[float | None]) -> dict[str, Any]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "min": None, "max": None}
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return {"mean": statistics.mean(vals), "std": std, "n": len(vals), "min": min(vals),
            "max": max(vals)}


FIELDS = ("fid", "precision", "recall", "steps_per_s", "images_per_s", "train_seconds",
          "trained_steps", "wall_seconds", "back_to_back_steps_per_s")
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
                    found[(spec.point_key, step)] = json.load(f)
    return found


def read_throughput(settings: Settings) -> dict[tuple[str, tuple[str, ...]], float]:
    """(method, row overrides) -> steps/s from `--out`/throughput.json (`--throughput-only`:
    each row's step timed back to back on an otherwise idle machine); {} when absent. The
    fine-tune stage's steps are keyed with the mask-ratio-0 override they run with."""
    path = os.path.join(settings.out, "throughput.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        rows = json.load(f)["results"]
    return {(r["method"], tuple(r.get("sets", ()))): r["steps_per_s"] for r in rows}


def _wall_seconds(point: dict, rates: dict) -> float | None:
    """Training seconds to `point` at the back-to-back step rates: the same clock for every
    row, whatever else the machine ran while the chart trained."""
    sets = tuple(point.get("row_sets", ()))
    rate = rates.get((point["method"], sets))
    if rate is None:
        return None
    seconds = point["step"] / rate
    extra = point.get("finetune_steps") or 0
    if extra:
        stage = rates.get((point["method"], (*sets, UNMASKED_STAGE_SET)))
        if stage is None:
            return None
        seconds += extra / stage
    return seconds


def _curves(settings: Settings, plan: list[RunSpec], points: dict) -> dict[str, list[dict]]:
    """Row label -> one aggregate per checkpoint step, over the row's seeds (in plan order)."""
    rates = read_throughput(settings)
    curves: dict[str, list[dict]] = {}
    for row in dict.fromkeys(s.row for s in plan if not s.sweep):
        runs = [s for s in plan if s.row == row and not s.sweep]
        for step in settings.steps:
            got = [points[(s.point_key, step)] for s in runs if (s.point_key, step) in points]
            got = [{**p, "wall_seconds": _wall_seconds(p, rates),
                    "back_to_back_steps_per_s": rates.get((p["method"],
                                                           tuple(p.get("row_sets", ()))))}
                   for p in got]
            if got:
                curves.setdefault(row, []).append({"step": step, **_aggregate(got)})
    return curves


def speed_of(row: dict) -> dict:
    """A curve point's steps/s statistic: back to back where measured, else as logged."""
    timed = row.get("back_to_back_steps_per_s", {})
    return timed if timed.get("mean") is not None else row["steps_per_s"]


def seconds_of(row: dict) -> float:
    """A curve point's training seconds: at the back-to-back rates where measured, else
    as the training logs timed them."""
    wall = row.get("wall_seconds", {}).get("mean")
    return wall if wall is not None else row["train_seconds"]["mean"]


def summarise(settings: Settings, plan: list[RunSpec], env: dict) -> dict[str, Any]:
    """chart.json: per-row curves (Fig. 4), final points (Fig. 3), the mask sweep
    (Fig. 5), aggregated over seeds, the verdict on the paper's ordering and each pair of
    rows compared against the seed spread."""
    points = read_points(settings, plan)
    curves = _curves(settings, plan, points)
    final = settings.steps[-1]
    sweep_model = method_model_name(settings.scale, "SD-DiT", True)
    mask = []
    for ratio in settings.mask_ratios:
        got = [points[(s.point_key, final)] for s in plan if s.model_name == sweep_model
               and abs(s.mask_ratio - ratio) < 1e-9 and (s.point_key, final) in points]
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
        "comparisons": comparisons(curves),
        "points": sorted(f"points/{os.path.basename(point_path(settings, s, st))}"
                         for s in plan for st in s.steps if (s.point_key, st) in points),
        "complete": len(points) == sum(len(s.steps) for s in plan),
    }


# The pairs the chart exists to settle: the paper's claims, and the ablations.
PAIRS = (("SD-DiT", "DiT"), ("SD-DiT", "MaskDiT"), ("MaskDiT", "DiT"), ("SD-DiT", "MDT"),
         ("SD-DiT", "SD-DiT (lambda_dis=0)"), ("MaskDiT", "MaskDiT (no fine-tune)"),
         ("SD-DiT", "SD-DiT (teacher at student sigma)"))


def _separated(a: dict, b: dict) -> bool | None:
    """Whether two rows' FIDs differ beyond their seed spread: their [min, max] ranges over
    seeds do not overlap. None when either row has a single seed (no spread measured)."""
    if a["n"] < 2 or b["n"] < 2:
        return None
    return a["max"] < b["min"] or b["max"] < a["min"]


def _fid_at_seconds(rows: list[dict], seconds: float) -> float | None:
    """A row's mean FID at `seconds` of training, linear between its checkpoints (None
    outside the range it was measured over)."""
    pts = [(seconds_of(r), r["fid"]["mean"]) for r in rows]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= seconds <= x1:
            return y0 + (y1 - y0) * (seconds - x0) / max(x1 - x0, 1e-9)
    return pts[0][1] if pts and abs(pts[0][0] - seconds) < 1e-9 else None


def comparisons(curves: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Each pair in PAIRS with both rows present: at equal steps (every checkpoint) the
    difference of mean FIDs and whether it is outside the seed spread; at equal wall-clock
    (the first row's training seconds at each checkpoint) the other row's interpolated
    FID."""
    out = []
    for a, b in PAIRS:
        if a not in curves or b not in curves:
            continue
        by_step = {r["step"]: r for r in curves[b]}
        steps = []
        for ra in curves[a]:
            rb = by_step.get(ra["step"])
            if rb is None:
                continue
            seconds = seconds_of(ra)
            steps.append({"step": ra["step"], "fid_a": ra["fid"]["mean"],
                          "fid_b": rb["fid"]["mean"],
                          "a_minus_b": ra["fid"]["mean"] - rb["fid"]["mean"],
                          "outside_seed_spread": _separated(ra["fid"], rb["fid"]),
                          "seconds_a": seconds,
                          "fid_b_at_seconds_a": _fid_at_seconds(curves[b], seconds)})
        out.append({"a": a, "b": b, "by_step": steps})
    return out


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


def table_markdown(summary: dict) -> str:
    """One row per chart row: steps/s, FID at each checkpoint (mean +- std over seeds,
    with the seed count), precision / recall at the last one."""
    steps = sorted({r["step"] for rows in summary["curves"].values() for r in rows})
    head = ["row", "seeds", "steps/s"] + [f"FID at {s:,}" for s in steps] + ["P / R at last"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rows in summary["curves"].items():
        by_step = {r["step"]: r for r in rows}
        last = rows[-1]
        cells = [label, str(last["fid"]["n"]), _num(speed_of(last))]
        cells += [_num(by_step[s]["fid"], 1) if s in by_step else "" for s in steps]
        cells.append(f"{_num(last['precision'], 3)} / {_num(last['recall'], 3)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def format_summary(summary: dict) -> str:
    lines = [f"chart ({summary['scale']}): FID at step {summary['final_step']}; "
             + summary["fid_note"]]
    for method, row in summary["final"].items():
        lines.append(f"  {method:<8} FID {_num(row['fid'])}  P {_num(row['precision'], 3)}"
                     f"  R {_num(row['recall'], 3)}  {_num(speed_of(row))} steps/s"
                     f"  {row['encoder_patches']} patches")
    for row in summary["mask_sweep"]:
        lines.append(f"  SD-DiT mask {row['mask_ratio']:.1f}: FID {_num(row['fid'])}")
    lines.append(f"  paper ordering holds at the final step: "
                 f"{summary['verdict']['final']['paper_order_holds']}")
    lines.append(f"  pictures: {', '.join(summary.get('pictures', []))}")
    return "\n".join(lines)
