"""`sddit demo` (what `make demo` runs): train the tiny SD-DiT on animal-mnist for a fixed
number of steps, write a class-row sample grid and the loss curve, measure FID, say where
it all is.

The run is bounded by steps, not by the clock, so that a busy machine makes it slower but
not worse: the default 2,400 steps take about 8.5 minutes on an idle 2-core CPU with the
CPU fast path (bf16, compiled; about 10 with the final grids and FID of 500 samples), and
the progress bar shows the ETA. `--minutes` bounds it
by wall-clock instead (the schedules then follow the steps the measured rate fits in).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from train.config import Config

DEFAULT_CONFIG = os.path.join("configs", "tiny.toml")
FID_REFERENCE = "animal-mnist:test"  # the 1000 held-out images (statistics cached)
# Guidance sharpens the class structure of a short CPU run (the net trains with label
# dropout, so it has the unconditional branch CFG needs).
GRID_CFG_SCALE = 2.0
# Measured on an idle 2-core CPU (AVX512-BF16): ~5.3 steps/s at batch 64 with
# configs/tiny.toml on the fast path, 8m26s for 2,400 steps including a cold compile; the
# whole demo took 9m59s and reached FID(500) 94.0 (README).
DEFAULT_STEPS = 2400


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train the tiny SD-DiT on animal-mnist, sample, FID",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"training steps (default {DEFAULT_STEPS}: about 8.5 minutes on an idle "
                        "2-core CPU)")
    p.add_argument("--minutes", type=float, default=None,
                   help="bound by a total time budget in minutes instead (training plus "
                        "sampling and FID)")
    p.add_argument("--fid-samples", type=int, default=500,
                   help="samples for FID against the held-out animal-mnist split (1000 "
                        "images); 0 skips FID. On a CPU the Inception network costs about "
                        "0.25 core-seconds per image: 500 take about 1.5 minutes")
    p.add_argument("--fid-steps", type=int, default=18, help="Heun steps for the FID samples")
    p.add_argument("--grid-cfg-scale", type=float, default=GRID_CFG_SCALE,
                   help="classifier-free guidance for the final class grid (default "
                        f"{GRID_CFG_SCALE:g}; 1 keeps the training loop's unguided grid)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"default {DEFAULT_CONFIG}")
    p.add_argument("--out", default=os.path.join("runs", "demo"),
                   help="run folder; if it exists, <out>-2, <out>-3, ... is used instead")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config overrides, as for `sddit train`")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def _fresh_run_dir(path: str) -> str:
    """`path`, or `path-2`, `path-3`, ... so a demo never mixes with an earlier run."""
    if not os.path.exists(path):
        return path
    n = 2
    while os.path.exists(f"{path}-{n}"):
        n += 1
    return f"{path}-{n}"


def _reserve_minutes(minutes: float, fid_samples: int, on_gpu: bool) -> float:
    """Time kept back from training for the final grids and FID: on a CPU about 0.35
    core-seconds per FID sample (Heun sampling plus Inception at 299 px). The first FID
    also computes the reference statistics once (1000 images, cached afterwards)."""
    if on_gpu:
        return min(1.0, 0.2 * minutes)
    reserve = 0.75 + 1.5 * fid_samples / 250  # 0.75: two class grids and the checkpoint
    return min(reserve, 0.5 * minutes)


def _guided_grid(checkpoint: str, cfg: Config, device: torch.device, cfg_scale: float) -> str:
    """The class grid again from the final sampling EMA, with classifier-free guidance."""
    from train.checkpoint import load_sampling_model
    from train.execution import accelerated_denoiser
    from train.sample import class_grid

    net, meta = load_sampling_model(checkpoint, device)
    net = accelerated_denoiser(net, cfg.run.precision, "off")  # 100 samples: eager
    steps = cfg.schedule.sample_steps
    path = os.path.join(cfg.run.dir, "samples", f"step{meta['step']:08d}_cfg{cfg_scale:g}.png")
    print(f"[demo] class grid with {steps} Heun steps, CFG scale {cfg_scale:g}")
    return class_grid(net, int(net.config.num_classes), cfg.schedule.sample_per_class, path,
                      num_steps=steps, cfg_scale=cfg_scale, seed=cfg.run.seed)


def _check_args(args: argparse.Namespace) -> None:
    from train.config import UsageError

    if args.steps < 1:
        raise UsageError(f"--steps must be a positive integer, got {args.steps}")
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise UsageError(f"--minutes must be a positive number, got {args.minutes}")
    if args.fid_samples < 0 or args.fid_steps < 1:
        raise UsageError("--fid-samples must be >= 0 and --fid-steps positive")


def run_demo(args: argparse.Namespace) -> int:
    from train.checkpoint import load_sampling_model
    from train.config import load_config
    from train.distributed import resolve_device
    from train.execution import accelerated_denoiser
    from train.logging_utils import format_seconds
    from train.loop import train

    _check_args(args)
    started = time.monotonic()
    device = resolve_device(args.device)
    fid_available = importlib.util.find_spec("metrics") is not None
    fid_samples = args.fid_samples if fid_available else 0
    run_dir = _fresh_run_dir(args.out)
    overrides = [f"run.dir={json.dumps(run_dir)}", f"run.device={json.dumps(device.type)}",
                 f"schedule.total_steps={args.steps}"]
    bound = f"{args.steps} steps"
    if args.minutes is not None:
        train_minutes = args.minutes - _reserve_minutes(args.minutes, fid_samples,
                                                        device.type == "cuda")
        overrides.append(f"schedule.max_minutes={train_minutes:.3f}")
        bound = f"up to {train_minutes:.1f} min or {args.steps} steps"
    cfg = load_config(args.config, overrides + list(args.overrides))
    print(f"[demo] training {cfg.model.name} on {cfg.data.source} ({device.type}) for "
          f"{bound}; run folder {run_dir}")
    result = train(cfg)
    trained = time.monotonic() - started
    grid = result.sample_grid
    if args.grid_cfg_scale != 1.0 and result.checkpoint:
        grid = _guided_grid(result.checkpoint, cfg, device, args.grid_cfg_scale)

    fid_line = "FID: skipped (--fid-samples 0)"
    if not fid_available:
        fid_line = "FID: skipped (the metrics package is not importable)"
    elif fid_samples > 0:
        from metrics.evaluate import evaluate_net

        net, _ = load_sampling_model(result.checkpoint, device)
        net = accelerated_denoiser(net, cfg.run.precision, cfg.run.compile, fid_samples)
        print(f"[demo] FID on {fid_samples} samples against held-out animal-mnist ...")
        t0 = time.monotonic()
        scores = evaluate_net(net, fid_samples, reference=FID_REFERENCE,
                              num_steps=args.fid_steps, progress=True, fid_method="features")
        fid_line = (f"FID ({fid_samples} samples vs held-out animal-mnist, "
                    f"{args.fid_steps} Heun steps): {scores['fid']:.2f} "
                    f"[{format_seconds(time.monotonic() - t0)}]")
        with open(os.path.join(run_dir, "fid.txt"), "w") as f:
            f.write(fid_line + "\n")

    print()
    print(f"[demo] done in {format_seconds(time.monotonic() - started)} "
          f"(training {format_seconds(trained)}, {result.step} steps, "
          f"stopped by {result.stopped_by}, final loss {result.final_loss:.4f})")
    print(f"  sample grid (one row per class): {grid}")
    if grid != result.sample_grid:
        print(f"  unguided grid (CFG scale 1):     {result.sample_grid}")
    print(f"  loss curve:                      {result.loss_curve}")
    print(f"  checkpoint:                      {result.checkpoint}")
    print(f"  metrics (JSONL):                 {result.metrics}")
    print(f"  {fid_line}")
    print(f"  more samples: python -m sddit sample --ckpt {run_dir} --num 100 "
          f"--cfg-scale {args.grid_cfg_scale:g}")
    return 0
