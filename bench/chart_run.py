"""Running the chart: train each run to each checkpoint step, score its sampling EMA
there (FID, precision/recall), write the point's JSON, show progress over the whole plan,
then write chart.json and the pictures; and the steps/s-only run. See bench/chart.py.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

import torch

import model
from bench._harness import environment, write_json
from bench.chart_plan import (
    SCHEMA,
    UNMASKED_STAGE_SET,
    ChartError,
    RunSpec,
    Settings,
    build_plan,
    config_hash,
    finetune_config,
    finetune_dir,
    method_config,
    method_model_name,
    plan_rows,
    point_path,
    run_config,
    stages,
)
from bench.chart_summary import now_utc, summarise, table_markdown

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
    finetune = spec.finetune_steps(step)
    return {
        "schema": SCHEMA, "scale": settings.scale, "method": spec.method, "row": spec.row,
        "run": spec.key, "row_sets": list(spec.sets), "sweep": spec.sweep, "seed": spec.seed,
        "step": step, "finetune_steps": finetune, "trained_steps": step + finetune,
        "total_steps": spec.planned_steps,
        "config": os.path.relpath(spec.config), "config_hash": config_hash(cfg),
        "batch_size": cfg.schedule.batch_size, **facts, **speed,
        "fid": scores["fid"], "precision": scores["precision"], "recall": scores["recall"],
        "fid_samples": scores["num_samples"], "fid_method": scores["fid_method"],
        "sampler": scores["sampler"], "reference": scores["reference"],
        "network": scores["network"], "eval_seconds": context["eval_seconds"],
        "device": env["device"], "threads": torch.get_num_threads(),
        "versions": {k: env.get(k) for k in ("torch", "triton", "python", "cuda")},
        "commit": env["commit"], "commit_dirty": env.get("commit_dirty"),
        "load_average": context["load"], "created": now_utc(),
    }


def save_samples(images, path: str, per_row: int = 10) -> str:
    """A uint8 [N, C, H, W] batch as one PNG grid (rows of `per_row`: one image per class)."""
    from train.logging_utils import save_tile_grid

    return save_tile_grid(images.transpose(0, 2, 3, 1), path, ncols=per_row, gap=2, border=1)


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
        self.tasks = [t for t in self.tasks if (t[0].point_key, t[1]) != (spec.point_key, step)]
        self.spent += seconds
        self._refresh(f"{spec.point_key} step {step}: FID {fid:.1f}")

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
    from train.distributed import resolve_device

    return resolve_device("auto", int(os.environ.get("LOCAL_RANK", "0")))


def finetune_to(settings: Settings, spec: RunSpec, step: int, start: str) -> tuple[str, Any]:
    """The fine-tune branch of `spec` at `step`: continued from the pre-training checkpoint
    `start` for its unmasked steps (done already: its checkpoint). Returns the checkpoint
    and the branch's config."""
    cfg = finetune_config(settings, spec, step)
    end = cfg.schedule.total_steps
    done, path = checkpoint_at_or_before(cfg.run.dir, end)
    if done == end and path is not None:
        return path, cfg
    from train.loop import train

    # A branch stopped midway (SIGTERM saves a checkpoint) continues from where it stopped.
    result = train(cfg, resume=path or start)
    if result.step != end:
        raise RuntimeError(f"{cfg.run.dir}: fine-tune stopped at step {result.step}, "
                           f"expected {end}")
    return result.checkpoint, cfg


def _branch_speed(speed: dict, branch_cfg, step: int) -> dict:
    """The pre-training run's steps/s, and training seconds through the branch's end."""
    extra = branch_cfg.schedule.unmasked_finetune_steps
    if not extra:
        return speed
    branch = throughput_from_log(os.path.join(branch_cfg.run.dir, "metrics.jsonl"),
                                 step + extra, branch_cfg.schedule.batch_size)
    return {**speed, "train_seconds": speed["train_seconds"] + branch["train_seconds"],
            "finetune_steps_per_s": branch["steps_per_s"]}


def run_point(settings: Settings, spec: RunSpec, step: int, evaluator: Evaluator,
              progress: PlanProgress | None, env: dict) -> dict:
    """Trains one run to `step` (and, for a fine-tune row, its branch from there), scores
    its EMA there and writes the point's JSON."""
    cfg = run_config(settings, spec)
    load = {"train_start": _load()}
    started = time.monotonic()
    before, _ = checkpoint_at_or_before(cfg.run.dir, step)
    checkpoint = train_to(cfg, step)
    branch_cfg = cfg
    if spec.finetune_frac:
        checkpoint, branch_cfg = finetune_to(settings, spec, step, checkpoint)
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
    speed = _branch_speed(throughput_from_log(os.path.join(cfg.run.dir, "metrics.jsonl"),
                                              step, cfg.schedule.batch_size), branch_cfg, step)
    record = point_record(settings, spec, step, branch_cfg, facts, speed, scores,
                          {"env": env, "eval_seconds": eval_seconds, "load": load})
    if is_main_process():
        if keep and scores.get("images") is not None:
            record["samples_png"] = os.path.relpath(save_samples(
                scores["images"],
                os.path.join(settings.out, "samples", f"{spec.point_key}.png")), settings.out)
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
    summary["run_configs"] = save_run_configs(settings, plan)
    write_json(os.path.join(settings.out, "chart.json"), summary)
    with open(os.path.join(settings.out, "table.md"), "w") as f:
        f.write(table_markdown(summary))
    if not settings.keep_checkpoints:
        for folder in run_folders(settings, plan).values():
            shutil.rmtree(folder, ignore_errors=True)
    return summary


def run_folders(settings: Settings, plan: list[RunSpec]) -> dict[str, str]:
    """name -> folder of every training run of the plan and every fine-tune branch."""
    folders = {spec.key: os.path.join(settings.work_dir, spec.key) for spec in plan}
    for spec in plan:
        for step in spec.steps if spec.finetune_frac else ():
            folder = finetune_dir(settings, spec, step)
            folders[os.path.basename(folder)] = folder
    return folders


def save_run_configs(settings: Settings, plan: list[RunSpec]) -> list[str]:
    """Each training run's resolved config (seed included) and each fine-tune branch's,
    copied to --out/configs/, so the results say how every point was trained after the
    work dir is gone. Returns the paths relative to --out."""
    saved = []
    for name, folder in sorted(run_folders(settings, plan).items()):
        source = os.path.join(folder, "config.json")
        if os.path.isfile(source):
            os.makedirs(os.path.join(settings.out, "configs"), exist_ok=True)
            shutil.copyfile(source, os.path.join(settings.out, "configs", f"{name}.json"))
            saved.append(f"configs/{name}.json")
    return saved


# ----------------------------------------------------------------------------- throughput


def time_training_step(name: str, overrides: dict, batch: int, steps: int, warmup: int,
                       device: torch.device, run: Any = None, planned_steps: int = 0
                       ) -> dict[str, Any]:
    """Median wall time of the training loop's own step (bench/step.py: forward, backward,
    optimizer, teacher momentum, sampling EMA) on synthetic data of the model's shape;
    bf16 autocast and the kernels on CUDA; on CPU the precision and compilation the chart's
    runs take (`run`: their RunConfig, deciding "auto" as for `planned_steps` steps)."""
    from bench.step import PathSpec, build_rig, time_steps

    path: Any = "kernels"
    if device.type != "cuda":
        path = PathSpec(False, "auto", precision="auto") if run is None else PathSpec(
            False, run.compile, precision=run.precision)
    rig = build_rig(name, path, batch, device, overrides=overrides,
                    planned_steps=planned_steps or max(steps, 1))
    times_ms, _, _ = time_steps(rig, warmup, steps)
    seconds = statistics.median(times_ms) / 1e3
    c = rig.net.config
    return {"model": name, "batch_per_device": batch, "steps_per_s": 1 / seconds,
            "images_per_s": batch / seconds,
            "train_gflops_per_image": model.flops_per_image(c, train=True) / 1e9,
            "encoder_patches": model.encoder_patches(c), "tokens": c.num_tokens,
            "params": sum(p.numel() for p in rig.net.parameters() if p.requires_grad)}


# The row label of a fine-tune row's unmasked steps in throughput.json.
FINETUNE_STAGE = "{} (fine-tune stage)"


def throughput_specs(settings: Settings) -> list[tuple[str, RunSpec]]:
    """(label, run) for each distinct row of the plan, and for a fine-tune row also its
    unmasked stage (the same run at mask ratio 0), whose steps cost more."""
    out: dict[str, RunSpec] = {}
    for row in plan_rows(settings):
        spec = RunSpec(row.method, method_model_name(settings.scale, row.method, False),
                       method_config(settings.scale, False), 0.0, settings.seeds[0],
                       settings.steps, False, row.label, row.sets, row.slug)
        key = (spec.model_name, spec.sets)
        if key not in {(s.model_name, s.sets) for s in out.values()}:
            out[row.label] = spec
        if row.finetune_frac:
            out[FINETUNE_STAGE.format(row.label)] = replace(
                spec, sets=(*row.sets, UNMASKED_STAGE_SET))
    return list(out.items())


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
    for label, spec in throughput_specs(settings):
        cfg = run_config(settings, spec)
        batch = cfg.schedule.batch_size // (8 if settings.scale == "paper" else 1)
        row = time_training_step(cfg.model.name, dict(cfg.model.overrides), batch, steps,
                                 warmup, device, cfg.run, max(settings.steps))
        rows.append({"method": spec.method, "row": label, "sets": list(spec.sets), **row})
        print(f"{label:<34} {row['steps_per_s']:8.2f} steps/s {row['images_per_s']:9.1f} "
              f"img/s {row['train_gflops_per_image']:8.2f} GFLOP/img  "
              f"{row['encoder_patches']} patches")
    path = os.path.join(settings.out, "throughput.json")
    if is_main_process():
        write_json(path, {"env": environment(), "scale": settings.scale, "steps": steps,
                          "warmup": warmup, "results": rows})
        print(f"wrote {path}")
    return 0
