"""The chart: training speed against FID for every registered method (the paper's Fig. 3-5).

    python -m bench.chart --scale small                  # ~45 min on a 2-core CPU
    python -m bench.chart --scale small --plan long      # tighter numbers, hours on CPU
    torchrun --nproc-per-node 8 -m bench.chart --scale paper --reference ADM_REF.npz
    python -m bench.chart --scale paper --throughput-only   # the steps/s half, one GPU

What it does. Every method in `model.METHODS` is trained by one recipe (same steps, batch,
optimiser, seed and therefore data order; `configs/chart/<scale>`), stopped at each
checkpoint step, and its sampling EMA scored there: FID and precision/recall (k = 3) of N
samples (EDM Heun, same N, steps, CFG and seeds for every method) against a held-out
reference. Steps/s is the median over the run's logged windows (the first window of each
training invocation, which holds start-up and warm-up, is left out); images/s is steps/s
x batch; training GFLOPs per image come from `model.flops_per_image(net, train=True)` and
"patches" from `model.encoder_patches`. An SD-DiT mask-ratio sweep gives Figure 5.

Each point is a JSON file in `--out/points/`; a rerun skips finished points and resumes each
training run from its newest checkpoint, so an interrupted chart continues where it
stopped. Training runs live in `--work-dir` (checkpoints never go into `--out`); they are
deleted at the end unless `--keep-checkpoints`. `chart.json` summarises every point and
says whether the paper's ordering holds; `chart_plot` draws the pictures.

FID from a few hundred samples is biased upwards against FID-50K (the bias shrinks like
1/N); compare methods only at equal N, which this chart guarantees.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import model
from bench._harness import environment, module_main, write_json

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs" / "chart"
SCHEMA = 1
MASK_RATIOS = (0.0, 0.2, 0.4, 0.6)  # the paper's Figure 5 sweep (SD-DiT)

# Plans for --scale small: checkpoint steps (the last is each run's length), FID samples.
# "default" fits ~45 min on 2 shared CPU cores (measured: see docs/chart.md).
SMALL_PLANS: dict[str, dict[str, Any]] = {
    "default": {"steps": (100, 200, 300), "fid_samples": 200},
    "long": {"steps": (500, 1000, 2000, 4000), "fid_samples": 1000},
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


@dataclass(frozen=True)
class RunSpec:
    """One training run: a method at a mask ratio and seed, evaluated at `steps`."""

    method: str
    model_name: str
    config: str
    mask_ratio: float
    seed: int
    steps: tuple[int, ...]
    sweep: bool  # set the mask ratio explicitly (Figure 5) rather than the preset's

    @property
    def key(self) -> str:
        return f"{self.model_name.replace('/', '')}_r{self.mask_ratio:.2f}_s{self.seed}"


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
              else MASK_RATIOS)
    paper = args.scale == "paper"
    settings = Settings(
        scale=args.scale, plan=args.plan, methods=methods, steps=steps,
        fid_samples=args.fid_samples or int(plan["fid_samples"]), mask_ratios=ratios,
        seeds=_csv(args.seeds, int, "seeds"), out=args.out or f"bench/results/chart-{args.scale}",
        work_dir=args.work_dir or f"runs/chart-{args.scale}",
        reference=args.reference or ("" if paper else "animal-mnist:test"),
        sampler_steps=args.sampler_steps or (18 if paper else 12), cfg_scale=args.cfg_scale,
        fid_batch=args.fid_batch or (250 if paper else 64), overrides=tuple(args.set or ()),
        keep_checkpoints=args.keep_checkpoints, threads=args.threads,
        progress=not args.no_progress, cache_dir=args.cache_dir)
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


def preset_mask_ratio(settings: Settings, method: str) -> float:
    """The mask ratio a method's run actually trains with (preset, then --set overrides)."""
    from train.config import load_config

    cfg = load_config(method_config(settings.scale, False), list(settings.overrides))
    fields = dict(cfg.model.overrides)
    return float(model.make_config(method_model_name(settings.scale, method, False),
                                   **fields).mask_ratio)


def build_plan(settings: Settings) -> list[RunSpec]:
    """Method runs (every checkpoint step), then the SD-DiT mask sweep (final step only). A
    sweep point that is SD-DiT's own run (same model and ratio: small scale at 0.2) reuses
    it; at paper scale the sweep is S/2 and the method runs XL/2, so all are separate."""
    runs: dict[str, RunSpec] = {}
    final = settings.steps[-1]
    for seed in settings.seeds:
        for method in settings.methods:
            spec = RunSpec(method, method_model_name(settings.scale, method, False),
                           method_config(settings.scale, False),
                           preset_mask_ratio(settings, method), seed, settings.steps, False)
            runs[spec.key] = spec
        for ratio in settings.mask_ratios:
            spec = RunSpec("SD-DiT", method_model_name(settings.scale, "SD-DiT", True),
                           method_config(settings.scale, True), ratio, seed, (final,), True)
            runs.setdefault(spec.key, spec)  # the method run already covers this point
    return list(runs.values())


def run_config(settings: Settings, spec: RunSpec):
    """The resolved training config of one run: the scale's recipe plus what the chart sets."""
    from train.config import load_config

    sets = [f"model.name={json.dumps(spec.model_name)}",
            f"run.dir={json.dumps(os.path.join(settings.work_dir, spec.key))}",
            f"run.seed={spec.seed}", f"schedule.total_steps={spec.steps[-1]}",
            *settings.overrides]
    if spec.sweep:
        sets.append(f"model.overrides.mask_ratio={spec.mask_ratio}")
    return load_config(spec.config, sets)


def config_hash(cfg) -> str:
    """Hash of everything that shapes the trained weights (not where they are written)."""
    from train.config import to_dict

    table = to_dict(cfg)
    for key in ("dir", "progress_bar", "tensorboard"):
        table["run"].pop(key, None)
    blob = json.dumps(table, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def point_path(settings: Settings, spec: RunSpec, step: int) -> str:
    return os.path.join(settings.out, "points", f"{spec.key}_step{step:07d}.json")


def stages(plan: list[RunSpec]) -> list[tuple[RunSpec, int]]:
    """(run, step) in step-major order: every run reaches a step before any goes further, so
    a shared machine's changing load falls on all methods alike."""
    steps = sorted({s for spec in plan for s in spec.steps})
    return [(spec, step) for step in steps for spec in plan if step in spec.steps]


# ----------------------------------------------------------------------------- training


def checkpoint_at_or_before(run_dir: str, step: int) -> tuple[int, str | None]:
    from train.checkpoint import list_checkpoints

    found = [(s, p) for s, p in list_checkpoints(run_dir) if s <= step]
    return found[-1] if found else (0, None)


def train_to(cfg, step: int) -> str:
    """THE one place the chart calls train(): brings cfg's run to `step` of its planned
    cfg.schedule.total_steps and returns the checkpoint there. A run with a checkpoint
    resumes from the newest one at or before `step`; a new run starts in an empty dir."""
    from train.checkpoint import checkpoint_path
    from train.loop import train

    done, path = checkpoint_at_or_before(cfg.run.dir, step)
    if done == step and path is not None:
        return path
    if path is None:
        result = train(cfg, stop_after=step)
    else:
        result = train(cfg, resume=path, stop_after=step - done)
    if result.step != step:
        raise RuntimeError(f"{cfg.run.dir}: training stopped at step {result.step} "
                           f"({result.stopped_by}), expected {step}")
    return result.checkpoint or checkpoint_path(cfg.run.dir, step)


def throughput_from_log(metrics_path: str, upto: int, batch: int) -> dict[str, Any]:
    """Steps/s (median of logged windows, leaving out each invocation's first window) and
    training seconds up to `upto`, from the loop's JSONL. Windows of an interrupted
    invocation that a resume redid are dropped."""
    from train.logging_utils import read_jsonl

    windows: list[tuple[int, int, float, bool]] = []  # (from, to, steps/s, first)
    prev, first = 0, True
    for record in read_jsonl(metrics_path):
        if record.get("event") == "start":
            prev, first = int(record["step"]), True
            windows = [w for w in windows if w[1] <= prev]
        elif record.get("event") == "train" and record.get("steps_per_s"):
            windows.append((prev, int(record["step"]), float(record["steps_per_s"]), first))
            prev, first = int(record["step"]), False
    used = [w for w in windows if w[1] <= upto]
    if not used:
        raise RuntimeError(f"{metrics_path}: no logged training windows up to step {upto}")
    steady = [w[2] for w in used if not w[3]] or [w[2] for w in used]
    rate = statistics.median(steady)
    return {"steps_per_s": rate, "images_per_s": rate * batch,
            "train_seconds": sum((b - a) / r for a, b, r, _ in used),
            "rate_windows": len(steady)}


# ----------------------------------------------------------------------------- evaluation


@dataclass
class Evaluator:
    """The FID network and reference, loaded once and shared by every point."""

    network: Any
    reference: Any
    device: torch.device

    def evaluate(self, settings: Settings, checkpoint: str, keep_images: int) -> dict:
        import metrics
        from train.checkpoint import load_sampling_model
        from train.data.latents import run_decoder
        from train.execution import accelerated_denoiser

        net, meta = load_sampling_model(checkpoint, self.device)
        decode = run_decoder(meta["config"]["data"], self.device, recorded=meta.get("latents"),
                             flag=VAE_FLAG)  # latent runs: their samples become images
        net = accelerated_denoiser(net, "auto", "auto", settings.fid_samples)
        fid_method = "features" if settings.fid_samples <= 5000 else "sqrtm"
        return metrics.evaluate_net(
            net, settings.fid_samples, self.reference, cfg_scale=settings.cfg_scale,
            num_steps=settings.sampler_steps, batch_size=settings.fid_batch, seed_offset=0,
            progress=settings.progress, network=self.network, fid_method=fid_method,
            keep_images=keep_images, cache_dir=settings.cache_dir, decode=decode)


VAE_FLAG = "--set data.vae=PATH"


def check_samples_decodable(settings: Settings, plan: list[RunSpec]) -> None:
    """Before any work: every latent run's VAE is there to turn its samples into images."""
    from train.data.latents import run_vae_spec

    for spec in plan:
        try:
            run_vae_spec(run_config(settings, spec).data, flag=VAE_FLAG)
        except OSError as exc:
            raise ChartError(f"{spec.key}: {exc}") from None


def load_evaluator(settings: Settings, device: torch.device, network=None) -> Evaluator:
    """Loads (computing and caching if needed) the reference once. Under torchrun the
    process group does not exist yet, so each evaluation resolves the cached reference
    itself, rank 0 loading and the others waiting (metrics.evaluate_net does that)."""
    import metrics

    network = network or metrics.load_network(device=device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return Evaluator(network, settings.reference, device)
    reference = metrics.load_reference(settings.reference, network, settings.cache_dir,
                                       settings.fid_batch, settings.progress, True)
    return Evaluator(network, reference, device)


def model_facts(build_record: dict[str, Any]) -> dict[str, Any]:
    """Parameters, FLOPs and patches of the trained network, rebuilt on the meta device from
    the build record its checkpoint carries (so data-derived fields are the real ones)."""
    with torch.device("meta"):
        probe = model.build(build_record["name"], **build_record["overrides"])
    c = probe.config
    trainable = sum(p.numel() for p in probe.parameters() if p.requires_grad)
    return {"model": build_record["name"], "params": trainable,
            "train_gflops_per_image": model.flops_per_image(c, train=True) / 1e9,
            "infer_gflops_per_image": model.flops_per_image(c, train=False) / 1e9,
            "encoder_patches": model.encoder_patches(c), "tokens": c.num_tokens,
            "mask_ratio": c.mask_ratio, "patch_size": c.patch_size}


# ----------------------------------------------------------------------------- records


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _load() -> list[float]:
    """The machine's 1/5/15-minute load averages: the CPU may be shared, so say how busy."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def point_record(settings: Settings, spec: RunSpec, step: int, cfg, facts: dict,
                 speed: dict, scores: dict, context: dict) -> dict[str, Any]:
    """One point's JSON: what was trained, how fast, how good, on what, at which commit."""
    env = context["env"]
    return {
        "schema": SCHEMA, "scale": settings.scale, "method": spec.method, "run": spec.key,
        "sweep": spec.sweep, "seed": spec.seed, "step": step, "total_steps": spec.steps[-1],
        "config": os.path.relpath(spec.config), "config_hash": config_hash(cfg),
        "batch_size": cfg.schedule.batch_size, **facts, **speed,
        "fid": scores["fid"], "precision": scores["precision"], "recall": scores["recall"],
        "fid_samples": scores["num_samples"], "fid_method": scores["fid_method"],
        "sampler": scores["sampler"], "reference": scores["reference"],
        "network": scores["network"], "eval_seconds": context["eval_seconds"],
        "device": env["device"], "threads": torch.get_num_threads(),
        "versions": {k: env.get(k) for k in ("torch", "triton", "python", "cuda")},
        "commit": env["commit"], "commit_dirty": env.get("commit_dirty"),
        "load_average": context["load"], "created": _now(),
    }


def save_samples(images, path: str, per_row: int = 10) -> str:
    """A uint8 [N, C, H, W] batch as one PNG grid (rows of `per_row`: one image per class)."""
    import numpy as np
    from PIL import Image

    n, c, h, w = images.shape
    rows = -(-n // per_row)
    grid = np.zeros((rows * (h + 2), per_row * (w + 2), c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, per_row)
        grid[r * (h + 2) + 1:r * (h + 2) + 1 + h, col * (w + 2) + 1:col * (w + 2) + 1 + w] = (
            image.transpose(1, 2, 0))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return path


# ----------------------------------------------------------------------------- progress


class PlanProgress:
    """One bar over the whole plan, in estimated seconds: each finished task replaces its
    estimate by what it took, and the per-step and per-sample costs learnt so far re-price
    what is left, so the ETA improves as the chart runs."""

    def __init__(self, todo: list[tuple[RunSpec, int]], settings: Settings) -> None:
        from tqdm.auto import tqdm

        self.settings = settings
        self.step_cost: dict[str, float] = {}  # run key -> seconds per step
        self.sample_cost: float | None = None
        self.tasks = [(spec, step, max([0, *[s for s in spec.steps if s < step]]))
                      for spec, step in todo]  # (run, to step, from step)
        self.spent = 0.0
        self.bar = tqdm(total=1, desc="chart", unit="s",
                        disable=not settings.progress or not is_main_process(),
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed"
                                   "{postfix}", dynamic_ncols=True)
        self._refresh("planned")

    def _estimate(self) -> float:
        known = list(self.step_cost.values())
        default_step = statistics.mean(known) if known else 1.0
        sample = self.sample_cost if self.sample_cost is not None else 0.3
        return sum((step - start) * self.step_cost.get(spec.key, default_step)
                   + self.settings.fid_samples * sample for spec, step, start in self.tasks)

    def _refresh(self, note: str) -> None:
        left = self._estimate()
        self.bar.total = max(self.spent + left, self.spent + 1e-6)
        self.bar.n = self.spent
        self.bar.set_postfix_str(f"ETA ~{left / 60:.0f} min | {note}")

    def trained(self, spec: RunSpec, step: int, seconds: float, steps_done: int) -> None:
        if steps_done > 0:
            self.step_cost[spec.key] = seconds / steps_done
        self.spent += seconds
        self.tasks = [(sp, st, step if (sp.key, st) == (spec.key, step) else start)
                      for sp, st, start in self.tasks]  # its training is done
        self._refresh(f"{spec.key} trained to {step}")

    def evaluated(self, spec: RunSpec, step: int, seconds: float, fid: float) -> None:
        self.sample_cost = seconds / self.settings.fid_samples
        self.tasks = [t for t in self.tasks if (t[0].key, t[1]) != (spec.key, step)]
        self.spent += seconds
        self._refresh(f"{spec.key} step {step}: FID {fid:.1f}")

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------- running


def tracked_changes() -> bool | None:
    """Whether tracked files differ from the recorded commit (None: not a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.strip())


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def eval_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def run_point(settings: Settings, spec: RunSpec, step: int, evaluator: Evaluator,
              progress: PlanProgress | None, env: dict) -> dict:
    """Trains one run to `step`, scores its EMA there and writes the point's JSON."""
    cfg = run_config(settings, spec)
    load = {"train_start": _load()}
    started = time.monotonic()
    before, _ = checkpoint_at_or_before(cfg.run.dir, step)
    checkpoint = train_to(cfg, step)
    if progress:
        progress.trained(spec, step, time.monotonic() - started, step - before)
    load["eval_start"] = _load()
    started = time.monotonic()
    keep = 40 if step == spec.steps[-1] else 0
    scores = evaluator.evaluate(settings, checkpoint, keep)
    eval_seconds = time.monotonic() - started
    load["eval_end"] = _load()
    from train.checkpoint import load_checkpoint

    facts = model_facts(load_checkpoint(checkpoint)["model_build"])
    speed = throughput_from_log(os.path.join(cfg.run.dir, "metrics.jsonl"), step,
                                cfg.schedule.batch_size)
    record = point_record(settings, spec, step, cfg, facts, speed, scores,
                          {"env": env, "eval_seconds": eval_seconds, "load": load})
    if is_main_process():
        if keep and scores.get("images") is not None:
            record["samples_png"] = os.path.relpath(save_samples(
                scores["images"], os.path.join(settings.out, "samples", f"{spec.key}.png")),
                settings.out)
        write_json(point_path(settings, spec, step), record)
    if progress:
        progress.evaluated(spec, step, eval_seconds, record["fid"])
    return record


def run_chart_plan(settings: Settings, network=None) -> dict[str, Any]:
    """Runs every unfinished point of the plan, then writes chart.json and the pictures.
    `network` replaces the FID Inception network (tests)."""
    plan = build_plan(settings)
    todo = [(spec, step) for spec, step in stages(plan)
            if not os.path.isfile(point_path(settings, spec, step))]
    for spec in plan:  # every config resolves before any work starts
        run_config(settings, spec)
    check_samples_decodable(settings, plan)
    env = {**environment(), "commit_dirty": tracked_changes()}
    if todo:
        evaluator = load_evaluator(settings, eval_device(), network)
        progress = PlanProgress(todo, settings)
        try:
            for spec, step in todo:
                run_point(settings, spec, step, evaluator, progress, env)
        finally:
            progress.close()
    if not is_main_process():
        return {}
    from bench.chart_plot import draw_all

    summary = summarise(settings, plan, env)
    summary["pictures"] = draw_all(summary, settings.out)
    write_json(os.path.join(settings.out, "chart.json"), summary)
    if not settings.keep_checkpoints:
        for spec in plan:
            shutil.rmtree(os.path.join(settings.work_dir, spec.key), ignore_errors=True)
    return summary


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
        "schema": SCHEMA, "scale": settings.scale, "created": _now(),
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


# ----------------------------------------------------------------------------- throughput


def time_training_step(name: str, overrides: dict, batch: int, steps: int, warmup: int,
                       device: torch.device) -> dict[str, Any]:
    """Median wall time of the training loop's own step (bench/step.py: forward, backward,
    optimizer, teacher momentum, sampling EMA) on synthetic data of the model's shape;
    bf16 autocast and the kernels on CUDA, the defaults' choices on CPU (bench step's
    "auto" path: measured precision, compiled)."""
    from bench.step import build_rig, time_steps

    rig = build_rig(name, "kernels" if device.type == "cuda" else "auto", batch, device,
                    overrides=overrides)
    times_ms, _, _ = time_steps(rig, warmup, steps)
    seconds = statistics.median(times_ms) / 1e3
    c = rig.net.config
    return {"model": name, "batch_per_device": batch, "steps_per_s": 1 / seconds,
            "images_per_s": batch / seconds,
            "train_gflops_per_image": model.flops_per_image(c, train=True) / 1e9,
            "encoder_patches": model.encoder_patches(c), "tokens": c.num_tokens,
            "params": sum(p.numel() for p in rig.net.parameters() if p.requires_grad)}


def throughput_only(settings: Settings, steps: int = 20, warmup: int = 5) -> int:
    """The steps/s half of the chart on one device: each method's training step at the
    per-device batch (the global 256 / 8 GPUs at paper scale), synthetic data, no FID.
    With DDP the all-reduce adds to this, so it bounds the 8-GPU steps/s from above."""
    if settings.scale == "paper" and not torch.cuda.is_available():
        print("bench.chart --throughput-only --scale paper: no CUDA device here; XL/2 steps "
              "on CPU would say nothing about the paper's speed. Nothing run.")
        return 0
    device = eval_device()
    rows = []
    for method in settings.methods:
        cfg = run_config(settings, RunSpec(
            method, method_model_name(settings.scale, method, False),
            method_config(settings.scale, False), 0.0, settings.seeds[0], settings.steps, False))
        batch = cfg.schedule.batch_size // (8 if settings.scale == "paper" else 1)
        row = time_training_step(cfg.model.name, dict(cfg.model.overrides), batch, steps,
                                 warmup, device)
        rows.append({"method": method, **row})
        print(f"{method:<8} {row['steps_per_s']:8.2f} steps/s {row['images_per_s']:9.1f} img/s "
              f"{row['train_gflops_per_image']:8.2f} GFLOP/img  {row['encoder_patches']} patches")
    path = os.path.join(settings.out, "throughput.json")
    if is_main_process():
        write_json(path, {"env": environment(), "scale": settings.scale, "steps": steps,
                          "warmup": warmup, "results": rows})
        print(f"wrote {path}")
    return 0


# ----------------------------------------------------------------------------- CLI


def add_chart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", choices=("small", "paper"), default="small",
                        help="small: tiny models on animal-mnist (CPU-sized); paper: XL/2 "
                             "and S/2 on ImageNet-256 latents, 8 GPUs via torchrun")
    parser.add_argument("--plan", choices=tuple(SMALL_PLANS), default="default",
                        help="small scale: 'default' fits ~45 CPU minutes, 'long' is tighter")
    parser.add_argument("--methods", default=None,
                        help=f"comma list, chart order; default every registered method "
                             f"({', '.join(model.METHODS)})")
    parser.add_argument("--steps", default=None,
                        help="comma list of checkpoint steps; the last is every run's length")
    parser.add_argument("--fid-samples", type=int, default=None, help="N samples per FID")
    parser.add_argument("--mask-ratios", default=None,
                        help="SD-DiT sweep for Fig. 5 (default 0,0.2,0.4,0.6; '' skips it)")
    parser.add_argument("--seeds", default="0", help="comma list; several give error bars")
    parser.add_argument("--out", default=None, help="results folder (default "
                        "bench/results/chart-<scale>): point JSONs, chart.json, pictures")
    parser.add_argument("--work-dir", default=None,
                        help="training runs and checkpoints (default runs/chart-<scale>)")
    parser.add_argument("--reference", default=None, help="FID reference (default "
                        "animal-mnist:test; paper: ADM's VIRTUAL_imagenet256_labeled.npz)")
    parser.add_argument("--cache-dir", default=None,
                        help="where FID reference statistics are cached (default $SDDIT_CACHE "
                             "or ~/.cache/sddit)")
    parser.add_argument("--sampler-steps", type=int, default=None,
                        help="EDM Heun steps (default 12 small, 18 paper)")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="guidance (1 = none)")
    parser.add_argument("--fid-batch", type=int, default=None)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="config override applied to every run alike (repeatable)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: 1 on CPU, where a second thread on shared "
                             "cores was measured to slow small steps down; else torch's)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep the training runs in --work-dir after the chart")
    parser.add_argument("--throughput-only", action="store_true",
                        help="only the steps/s half, on one device (paper scale: CUDA)")
    parser.add_argument("--no-progress", action="store_true")


def run_chart(args: argparse.Namespace) -> int:
    from train.config import ConfigError

    try:
        settings = settings_from_args(args)
        _check_reference(settings)
        for spec in build_plan(settings):  # every run's config resolves before any work
            run_config(settings, spec)
        if not args.throughput_only and (settings.scale != "paper" or torch.cuda.is_available()):
            check_samples_decodable(settings, build_plan(settings))  # (else refused below)
    except (ChartError, ConfigError, ValueError) as exc:
        print(f"bench.chart: {exc}", file=sys.stderr)
        return 2
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    elif not torch.cuda.is_available():
        torch.set_num_threads(1)
    if args.throughput_only:
        return throughput_only(settings)
    if settings.scale == "paper" and not torch.cuda.is_available():
        print("bench.chart: --scale paper trains XL/2 for 400k steps on 8 GPUs; there is no "
              "CUDA device here. Use --scale small, or --throughput-only on a GPU.",
              file=sys.stderr)
        return 2
    summary = run_chart_plan(settings)
    if summary:  # rank 0
        print(format_summary(summary))
    return 0


def _check_reference(settings: Settings) -> None:
    ref = settings.reference
    if ref.endswith(".npz") and not os.path.isfile(ref):
        raise ChartError(f"--reference: {ref} not found")


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


def main(argv: list[str] | None = None) -> int:
    return module_main("python -m bench.chart", __doc__, add_chart_arguments, run_chart, argv)


if __name__ == "__main__":
    sys.exit(main())
