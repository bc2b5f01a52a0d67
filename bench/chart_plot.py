"""The chart's pictures, drawn from chart.json's summary (PNG and SVG each).

- fig3_speed_vs_fid: x = training steps/s, y = FID at the final step, one point per method,
  labelled "<method>, <patches> patches" (the paper's Figure 3);
- fig4_fid_vs_steps: FID against training steps, one line per method, and a second panel
  against training wall-clock seconds, since equal steps are not equal compute (Figure 4);
- fig5_fid_vs_mask_ratio: SD-DiT's FID against its mask ratio (Figure 5);
- samples: the final sampling EMA of each method, one column per class.
Error bars (one standard deviation over seeds) appear when several seeds were run; in
Figure 4 a band spans the lowest to the highest seed's FID at each checkpoint.
At paper scale, published numbers are overlaid as hollow markers labelled "published".
"""

from __future__ import annotations

import os
from typing import Any

from bench.chart_summary import seconds_of, speed_of

# Published FID-50K without guidance at 400k steps (METHOD.md's reference numbers), drawn
# on the paper-scale Figure 4 only: they come from other code and ImageNet, not this run.
PUBLISHED: tuple[dict[str, Any], ...] = (
    {"label": "DiT-XL/2 (published)", "model": "DiT-XL/2", "step": 400_000, "fid": 19.5},
    {"label": "DiT-S/2 (published)", "model": "DiT-S/2", "step": 400_000, "fid": 68.4},
)
COLORS = {"SD-DiT": "tab:red", "MaskDiT": "tab:blue", "DiT": "tab:gray", "MDT": "tab:green"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def _color(method: str) -> str:
    return COLORS.get(method, "tab:purple")


def _mean_std(stat: dict) -> tuple[float | None, float | None]:
    return stat["mean"], stat["std"]


def _save(fig, out: str, stem: str) -> list[str]:
    paths = []
    for ext in ("png", "svg"):
        path = os.path.join(out, f"{stem}.{ext}")
        fig.savefig(path, dpi=110 if ext == "png" else None, bbox_inches="tight")
        paths.append(os.path.relpath(path, out))
    _pyplot().close(fig)
    return paths


def _subtitle(summary: dict) -> str:
    s = summary["settings"]
    return (f"{summary['scale']} scale, FID of {s['fid_samples']} samples vs {s['reference']} "
            f"(biased up vs FID-50K), EDM Heun {s['sampler_steps']} steps, CFG {s['cfg_scale']:g}"
            f", seeds {','.join(str(x) for x in s['seeds'])}")


def fig3_speed_vs_fid(summary: dict, out: str) -> list[str]:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    rows = [(m, r) for m, r in summary["final"].items()
            if speed_of(r)["mean"] is not None and r["fid"]["mean"] is not None]
    xs = [speed_of(r)["mean"] for _, r in rows] or [0.0]
    ys = [r["fid"]["mean"] for _, r in rows] or [0.0]
    xspan, yspan = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float]] = []
    for method, row in rows:
        x, xerr = _mean_std(speed_of(row))
        y, yerr = _mean_std(row["fid"])
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", ms=9, capsize=4,
                    color=_row_style(summary, method)[0], label=method)
        # A label that would run into an earlier one goes below its point instead.
        crowded = any(abs(x - px) < 0.4 * xspan and abs(y - py) < 0.06 * yspan
                      for px, py in placed)
        ax.annotate(f"{method}, {row['encoder_patches']} patches", (x, y),
                    textcoords="offset points", xytext=(8, -14 if crowded else 6), fontsize=9)
        placed.append((x, y))
    device = summary["environment"].get("device")
    timed = any(r.get("back_to_back_steps_per_s", {}).get("mean") is not None
                for _, r in rows)
    how = "back to back, idle machine" if timed else "median after warm-up, as logged"
    ax.set_xlabel(f"training speed (steps/s on {device}, {how})")
    ax.set_ylabel(f"FID at step {summary['final_step']:,} (lower is better)")
    ax.set_title("Training speed vs FID (paper Fig. 3 analogue)\n" + _subtitle(summary),
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.2)
    return _save(fig, out, "fig3_speed_vs_fid")


_ROW_STYLES = ("-", "--", ":", "-.")


def _row_style(summary: dict, label: str) -> tuple[str, str]:
    """A row's colour (its method's) and line style (the method's ablations dashed)."""
    method = next((m for m in COLORS if label == m or label.startswith(m + " ")), label)
    same = [r for r in summary["curves"] if r == method or r.startswith(method + " (")]
    return _color(method), _ROW_STYLES[same.index(label) % len(_ROW_STYLES)]


def _x(row: dict, x_key: str) -> float:
    if x_key == "seconds":
        return seconds_of(row)
    trained = row.get("trained_steps", {}).get("mean")
    return trained if trained is not None else row["step"]


def _curve_panel(ax, summary: dict, x_key: str) -> None:
    """Mean FID per row; with several seeds a band from the lowest to the highest seed's
    FID at each checkpoint."""
    for label, rows in summary["curves"].items():
        color, style = _row_style(summary, label)
        xs = [_x(r, x_key) for r in rows]
        ys = [r["fid"]["mean"] for r in rows]
        seeds = rows[-1]["fid"]["n"]
        ax.plot(xs, ys, marker="o", color=color, ls=style,
                label=f"{label} ({rows[-1]['encoder_patches']} patches, {seeds} "
                      f"seed{'s' if seeds != 1 else ''})")
        if all(r["fid"]["n"] > 1 for r in rows):
            ax.fill_between(xs, [r["fid"]["min"] for r in rows],
                            [r["fid"]["max"] for r in rows], color=color, alpha=0.15)
    ax.grid(alpha=0.3)
    ax.set_ylabel("FID (lower is better)")


def _published_panel(ax, summary: dict) -> None:
    if summary["scale"] != "paper":
        return
    models = {row.get("model") for rows in summary["curves"].values() for row in rows}
    for pub in PUBLISHED:
        if pub["model"].replace("DiT-", "") in {str(m).split("-")[-1] for m in models}:
            ax.plot([pub["step"]], [pub["fid"]], marker="D", mfc="none", ms=9, ls="none",
                    color="black", label=pub["label"] + " published")


def fig4_fid_vs_steps(summary: dict, out: str) -> list[str]:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    _curve_panel(left, summary, "step")
    _published_panel(left, summary)
    left.set_xlabel("training steps (a fine-tuned point: pre-training + its unmasked steps)")
    _curve_panel(right, summary, "seconds")
    timed = any(r.get("wall_seconds", {}).get("mean") is not None
                for rows in summary["curves"].values() for r in rows)
    clock = "at each row's back-to-back step rate" if timed else "as logged while training"
    right.set_xlabel(f"training seconds ({summary['environment'].get('device')}, {clock})")
    left.legend(fontsize=8)
    fig.suptitle("FID during training (paper Fig. 4 analogue)\n" + _subtitle(summary),
                 fontsize=9)
    return _save(fig, out, "fig4_fid_vs_steps")


def fig5_fid_vs_mask_ratio(summary: dict, out: str) -> list[str]:
    rows = summary["mask_sweep"]
    if not rows:
        return []
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs = [r["mask_ratio"] for r in rows]
    ys = [r["fid"]["mean"] for r in rows]
    errs = [r["fid"]["std"] for r in rows]
    ax.errorbar(xs, ys, yerr=errs if all(e is not None for e in errs) else None, marker="o",
                capsize=4, color=_color("SD-DiT"), label=f"SD-DiT ({rows[0]['model']})")
    for x, y, r in zip(xs, ys, rows, strict=True):
        ax.annotate(f"{r['encoder_patches']} patches", (x, y), textcoords="offset points",
                    xytext=(4, 6), fontsize=8)
    ax.set_xlabel("mask ratio")
    ax.set_ylabel(f"FID at step {summary['final_step']:,}")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("SD-DiT: FID vs mask ratio (paper Fig. 5 analogue)\n" + _subtitle(summary),
                 fontsize=9)
    return _save(fig, out, "fig5_fid_vs_mask_ratio")


def samples_figure(summary: dict, out: str) -> list[str]:
    """The final EMA's first samples of each method (4 per class), side by side."""
    from PIL import Image

    grids = [(m, row.get("samples_png")) for m, row in summary["final"].items()]
    grids = [(m, p) for m, p in grids if p and os.path.isfile(os.path.join(out, p))]
    if not grids:
        return []
    plt = _pyplot()
    fig, axes = plt.subplots(len(grids), 1, figsize=(6.5, 2.6 * len(grids)), squeeze=False)
    for ax, (method, path) in zip(axes[:, 0], grids, strict=True):
        ax.imshow(Image.open(os.path.join(out, path)), cmap="gray", interpolation="nearest")
        fid = summary["final"][method]["fid"]["mean"]
        ax.set_title(f"{method}, step {summary['final_step']:,}, FID {fid:.1f}", fontsize=9)
        ax.axis("off")
    fig.suptitle("Sampling EMA at the final step (columns: classes; same seeds for every "
                 "method)", fontsize=9)
    return _save(fig, out, "samples")


def draw_all(summary: dict, out: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    paths = []
    for draw in (fig3_speed_vs_fid, fig4_fid_vs_steps, fig5_fid_vs_mask_ratio, samples_figure):
        paths += draw(summary, out)
    return paths
