"""The chart's plan: its settings (from the command line, checked before any work) and
the training runs they make (which method, model, config, mask ratio and seed, evaluated
at which steps), with where each point's JSON goes. See bench/chart.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import model

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs" / "chart"
SCHEMA = 1
MASK_RATIOS = (0.0, 0.2, 0.4, 0.6)  # the paper's Figure 5 sweep (SD-DiT)



@dataclass(frozen=True)
class Row:
    """One line of the chart: a method, optionally changed by config overrides (an
    ablation), trained from the chart's seeds (`seeds`: only the first that many).
    `finetune_frac` > 0 scores MaskDiT as published: each checkpoint S of its masked
    pre-training run is continued for round(finetune_frac S) unmasked steps (its second
    stage, schedule.unmasked_finetune_steps) in a branch run, and the branch is scored.
    Rows with the same method, overrides and seed share their training run."""

    label: str
    method: str
    sets: tuple[str, ...] = ()
    slug: str = ""  # names the training run when `sets` change it
    seeds: int | None = None
    finetune_frac: float = 0.0


# The long plan's rows (issue: each method as published, and the ablations that say
# whether self-distillation helps): MaskDiT with its unmasked fine-tune, scaled to ~5% of
# each point's steps as in its public recipe; its pre-training run, scored as it is, is
# the "no fine-tune" row (every seed, at no extra cost).
# The override that times a fine-tune row's unmasked stage in throughput.json (the same
# run at mask ratio 0), and by which the summary finds that stage's rate.
UNMASKED_STAGE_SET = "model.overrides.mask_ratio=0.0"

LONG_ROWS = (
    Row("DiT", "DiT"),
    Row("MaskDiT", "MaskDiT", finetune_frac=0.05),
    Row("MaskDiT (no fine-tune)", "MaskDiT"),
    Row("SD-DiT", "SD-DiT"),
    Row("SD-DiT (lambda_dis=0)", "SD-DiT", ("model.overrides.lambda_dis=0.0",), "ld0"),
    Row("MDT", "MDT", seeds=1),
    Row("SD-DiT (teacher at student sigma)", "SD-DiT",
        ('model.overrides.teacher_sigma="student"',), "tstudent", seeds=1),
)

# Plans for --scale small: checkpoint steps, FID samples, and optionally each run's planned
# length (run_steps; default: the last checkpoint), rows, seeds and the mask sweep (else: a
# row per --methods entry, --seeds, the sweep of --mask-ratios). "default" fits ~45 min on
# 2 shared CPU cores. "long" scores runs planned for 3,000 steps (their warm-ups and
# teacher-momentum cosines) at 1k and 2k: what ~4 CPU hours with the CPU fast path afford
# for its 14 runs, 6 fine-tune branches and 34 FID-1000 points (docs/chart.md).
SMALL_PLANS: dict[str, dict[str, Any]] = {
    "default": {"steps": (100, 200, 300), "fid_samples": 200},
    "long": {"steps": (1000, 2000), "run_steps": 3000, "fid_samples": 1000,
             "rows": LONG_ROWS, "seeds": (0, 1, 2), "mask_ratios": ()},
}
# --scale paper: FID-50K at these steps (assumed: 100k apart up to the 400k of the
# published table), EDM Heun with 18 steps (35 evaluations), no guidance.
PAPER_PLAN: dict[str, Any] = {"steps": (100_000, 200_000, 300_000, 400_000),
                              "fid_samples": 50_000}


class ChartError(ValueError):
    """A chart argument that cannot work, found before any training starts."""


@dataclass(frozen=True)
class Settings:
    scale: str
    plan: str
    methods: tuple[str, ...]
    steps: tuple[int, ...]
    fid_samples: int
    mask_ratios: tuple[float, ...]
    seeds: tuple[int, ...]
    out: str
    work_dir: str
    reference: str
    sampler_steps: int
    cfg_scale: float
    fid_batch: int
    overrides: tuple[str, ...] = ()
    keep_checkpoints: bool = False
    threads: int = 0
    progress: bool = True
    cache_dir: str | None = None  # FID reference statistics (None: $SDDIT_CACHE or ~/.cache)
    rows: tuple[Row, ...] = ()  # empty: one plain row per method
    run_steps: int = 0  # each run's planned length (0: the last checkpoint step)


@dataclass(frozen=True)
class RunSpec:
    """One row's training run: a method at a mask ratio and seed (plus the row's
    overrides), evaluated at `steps`; with `finetune_frac`, each evaluation is of an
    unmasked fine-tune branch from that step (Row)."""

    method: str
    model_name: str
    config: str
    mask_ratio: float
    seed: int
    steps: tuple[int, ...]
    sweep: bool  # set the mask ratio explicitly (Figure 5) rather than the preset's
    label: str = ""  # the row (default: the method)
    sets: tuple[str, ...] = ()  # the row's config overrides
    slug: str = ""
    finetune_frac: float = 0.0
    run_steps: int = 0  # the planned length (schedule.total_steps); 0: the last of `steps`

    @property
    def planned_steps(self) -> int:
        return max(self.run_steps, self.steps[-1])

    @property
    def key(self) -> str:
        """The training run (its folder); rows that train alike share it."""
        base = f"{self.model_name.replace('/', '')}_r{self.mask_ratio:.2f}_s{self.seed}"
        return f"{base}_{self.slug}" if self.slug else base

    @property
    def point_key(self) -> str:
        """The row's points: the run's, or its fine-tune branches'."""
        return f"{self.key}_ft" if self.finetune_frac else self.key

    @property
    def row(self) -> str:
        return self.label or self.method

    def finetune_steps(self, step: int) -> int:
        """The unmasked steps of the fine-tune branch at `step` (at least 1 when asked)."""
        return max(1, int(round(self.finetune_frac * step))) if self.finetune_frac else 0


# ----------------------------------------------------------------------------- settings


def _csv(text: str, kind: type, name: str) -> tuple:
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        return tuple(kind(t) for t in items)
    except ValueError:
        raise ChartError(f"--{name}: expected comma-separated {kind.__name__}s, got {text!r}"
                         ) from None


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Resolves defaults from the scale and plan, and checks every argument."""
    plan = PAPER_PLAN if args.scale == "paper" else SMALL_PLANS[args.plan]
    methods = _csv(args.methods, str, "methods") if args.methods else tuple(model.METHODS)
    steps = _csv(args.steps, int, "steps") if args.steps else tuple(plan["steps"])
    ratios = (_csv(args.mask_ratios, float, "mask-ratios") if args.mask_ratios is not None
              else tuple(plan.get("mask_ratios", MASK_RATIOS)))
    seeds = (_csv(args.seeds, int, "seeds") if args.seeds is not None
             else tuple(plan.get("seeds", (0,))))
    rows = tuple(r for r in plan.get("rows", ()) if r.method in methods)
    paper = args.scale == "paper"
    settings = Settings(
        scale=args.scale, plan=args.plan, methods=methods, steps=steps,
        fid_samples=args.fid_samples or int(plan["fid_samples"]), mask_ratios=ratios,
        seeds=seeds, out=args.out or f"bench/results/chart-{args.scale}",
        work_dir=args.work_dir or f"runs/chart-{args.scale}",
        reference=args.reference or ("" if paper else "animal-mnist:test"),
        sampler_steps=args.sampler_steps or (18 if paper else 12), cfg_scale=args.cfg_scale,
        fid_batch=args.fid_batch or (250 if paper else 64), overrides=tuple(args.set or ()),
        keep_checkpoints=args.keep_checkpoints, threads=args.threads,
        progress=not args.no_progress, cache_dir=args.cache_dir, rows=rows,
        run_steps=int(plan.get("run_steps", 0)))
    validate_settings(settings)
    return settings


def validate_settings(s: Settings) -> None:
    unknown = [m for m in s.methods if m not in model.METHODS]
    if not s.methods or unknown:
        raise ChartError(f"--methods: unknown {unknown or 'empty list'}; registered methods "
                         f"are {', '.join(model.METHODS)}")
    if not s.steps or any(b <= a for a, b in zip(s.steps, s.steps[1:], strict=False)) or (
            s.steps[0] < 1):
        raise ChartError(f"--steps: expected increasing positive step counts, got {s.steps}")
    if s.fid_samples < 4:
        raise ChartError(f"--fid-samples: need at least 4 (precision/recall use k = 3), got "
                         f"{s.fid_samples}")
    if any(not 0.0 <= r < 1.0 for r in s.mask_ratios):
        raise ChartError(f"--mask-ratios: each must be in [0, 1), got {s.mask_ratios}")
    if s.mask_ratios and "SD-DiT" not in model.METHODS:
        raise ChartError("--mask-ratios: the sweep trains SD-DiT, which is not registered")
    if not s.seeds or any(x < 0 for x in s.seeds) or len(set(s.seeds)) != len(s.seeds):
        raise ChartError(f"--seeds: expected distinct non-negative integers, got {s.seeds}")
    if s.sampler_steps < 1 or s.fid_batch < 1:
        raise ChartError("--sampler-steps and --fid-batch must be positive")
    if s.scale == "paper" and not s.reference:
        raise ChartError("--reference: --scale paper needs ADM's VIRTUAL_imagenet256_labeled.npz "
                         "(download it yourself; nothing is fetched at run time)")
    if os.path.abspath(s.work_dir).startswith(os.path.abspath(s.out) + os.sep):
        raise ChartError(f"--work-dir {s.work_dir} is inside --out {s.out}: checkpoints must "
                         "not land in the results folder")


# ----------------------------------------------------------------------------- the plan


def method_model_name(scale: str, method: str, sweep: bool) -> str:
    if scale == "small":
        return f"{method}-tiny"
    return f"{method}-S/2" if sweep else f"{method}-XL/2"


def method_config(scale: str, sweep: bool) -> str:
    if scale == "small":
        return str(CONFIG_ROOT / "small.toml")
    return str(CONFIG_ROOT / "paper" / ("s2-mask.toml" if sweep else "xl2.toml"))


def preset_mask_ratio(settings: Settings, method: str, sets: tuple[str, ...] = ()) -> float:
    """The mask ratio a method's run actually trains with (preset, then --set overrides)."""
    from train.config import load_config

    cfg = load_config(method_config(settings.scale, False), [*settings.overrides, *sets])
    fields = dict(cfg.model.overrides)
    return float(model.make_config(method_model_name(settings.scale, method, False),
                                   **fields).mask_ratio)


def pin_precision(settings: Settings) -> tuple[Settings, str | None]:
    """One precision for every run of the chart: where the recipe leaves run.precision at
    "auto", decide it once now (train/execution.py, measured at the first row's width) and
    pin it, so that no run decides alone on a busy moment. Returns the settings with the
    pin added (unchanged when a precision is already set) and the decision's reason."""
    from train.config import load_config
    from train.distributed import resolve_device
    from train.execution import choose_precision

    row = plan_rows(settings)[0]
    cfg = load_config(method_config(settings.scale, False), [*settings.overrides, *row.sets])
    if cfg.run.precision != "auto":
        return settings, None
    width = model.make_config(method_model_name(settings.scale, row.method, False),
                              **cfg.model.overrides).hidden_size
    choice = choose_precision("auto", resolve_device(cfg.run.device), width)
    pinned = (*settings.overrides, f'run.precision="{choice.name}"')
    return replace(settings, overrides=pinned), f"{choice.name}: {choice.reason}"


def plan_rows(settings: Settings) -> tuple[Row, ...]:
    return settings.rows or tuple(Row(m, m) for m in settings.methods)


def build_plan(settings: Settings) -> list[RunSpec]:
    """Row runs (every checkpoint step), then the SD-DiT mask sweep (final step only). A
    sweep point that is SD-DiT's own run (same model and ratio: small scale at 0.2) reuses
    it; at paper scale the sweep is S/2 and the method runs XL/2, so all are separate."""
    runs: dict[str, RunSpec] = {}
    final = settings.steps[-1]
    for index, seed in enumerate(settings.seeds):
        for row in plan_rows(settings):
            if row.seeds is not None and index >= row.seeds:
                continue
            spec = RunSpec(row.method, method_model_name(settings.scale, row.method, False),
                           method_config(settings.scale, False),
                           preset_mask_ratio(settings, row.method, row.sets), seed,
                           settings.steps, False, row.label, row.sets, row.slug,
                           row.finetune_frac, settings.run_steps)
            runs[spec.point_key] = spec
        for ratio in settings.mask_ratios:
            spec = RunSpec("SD-DiT", method_model_name(settings.scale, "SD-DiT", True),
                           method_config(settings.scale, True), ratio, seed, (final,), True)
            runs.setdefault(spec.point_key, spec)  # the method run already covers this point
    return list(runs.values())


def run_config(settings: Settings, spec: RunSpec):
    """The resolved training config of one run: the scale's recipe plus what the chart sets."""
    from train.config import load_config

    sets = [f"model.name={json.dumps(spec.model_name)}",
            f"run.dir={json.dumps(os.path.join(settings.work_dir, spec.key))}",
            f"run.seed={spec.seed}", f"schedule.total_steps={spec.planned_steps}",
            *settings.overrides, *spec.sets]
    if spec.sweep:
        sets.append(f"model.overrides.mask_ratio={spec.mask_ratio}")
    return load_config(spec.config, sets)


def finetune_config(settings: Settings, spec: RunSpec, step: int):
    """The fine-tune branch from `spec`'s checkpoint at `step`: its own folder, planned to
    step + F with the last F steps unmasked (F = spec.finetune_steps(step))."""
    from train.config import load_config

    extra = spec.finetune_steps(step)
    sets = [f"model.name={json.dumps(spec.model_name)}",
            f"run.dir={json.dumps(finetune_dir(settings, spec, step))}",
            f"run.seed={spec.seed}", f"schedule.total_steps={step + extra}",
            f"schedule.unmasked_finetune_steps={extra}", *settings.overrides, *spec.sets]
    return load_config(spec.config, sets)


def finetune_dir(settings: Settings, spec: RunSpec, step: int) -> str:
    return os.path.join(settings.work_dir, f"{spec.key}_ft{step:07d}")


def config_hash(cfg) -> str:
    """Hash of everything that shapes the trained weights (not where they are written)."""
    from train.config import to_dict

    table = to_dict(cfg)
    for key in ("dir", "progress_bar", "tensorboard"):
        table["run"].pop(key, None)
    blob = json.dumps(table, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def point_path(settings: Settings, spec: RunSpec, step: int) -> str:
    return os.path.join(settings.out, "points", f"{spec.point_key}_step{step:07d}.json")


def stages(plan: list[RunSpec]) -> list[tuple[RunSpec, int]]:
    """(run, step) in step-major order: every run reaches a step before any goes further, so
    a shared machine's changing load falls on all methods alike."""
    steps = sorted({s for spec in plan for s in spec.steps})
    return [(spec, step) for step in steps for spec in plan if step in spec.steps]
