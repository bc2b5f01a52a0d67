"""A short real run of the trainer that needs no data package: the device check's last stage.

    python -m bench.train_short --minutes 0.5 --out device-out/train_short.json [--gpu-only]

It runs `train.loop.train` (the loop, checkpoint, sample grid and all) on the tiny preset
config, fed through the `batches=` argument with **synthetic silhouettes** shaped like the
embedded animal-mnist set: 10,000 single-channel 28x28 images zero-padded to 32x32, 10
classes, in [-1, 1], served by train.data's own TensorBatches and EpochSampler (per-epoch
shuffle, flips). Each class is a filled ellipse with its own orientation and thickness,
jittered in position and size, so the loss has something to learn. Use it for throughput
and for checking that the loop runs on a machine without animal-mnist or network; its
samples and loss are not comparable with animal-mnist runs.

The JSON holds the run's result, its last train records (images/s, steps/s, loss, GPU
telemetry) and where the data came from. `--gpu-only` makes a machine without CUDA say
"no GPU", write that, and exit 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

import numpy as np
import torch

from bench._harness import environment, write_json

NUM_SAMPLES, NUM_CLASSES, SIZE, PAD = 10_000, 10, 28, 2


def synthetic_silhouettes(num: int = NUM_SAMPLES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [num, 32, 32] filled ellipses (class k: angle k*pi/10, half-axes 11 and
    2.5 + 0.7k, before jitter) and int64 labels [num], balanced over the 10 classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num, dtype=np.int64) % NUM_CLASSES
    rng.shuffle(labels)
    angle = labels * np.pi / NUM_CLASSES + rng.normal(0, 0.08, num)
    scale = rng.uniform(0.8, 1.1, num)
    a, b = 11.0 * scale, (2.5 + 0.7 * labels) * scale
    cx, cy = (SIZE - 1) / 2 + rng.uniform(-2, 2, (2, num))
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)  # [28, 28] each
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    u, v = (dx * cos + dy * sin) / a[:, None, None], (-dx * sin + dy * cos) / b[:, None, None]
    inside = (u * u + v * v) <= 1.0  # [num, 28, 28]
    images = np.zeros((num, SIZE + 2 * PAD, SIZE + 2 * PAD), np.uint8)
    images[:, PAD:PAD + SIZE, PAD:PAD + SIZE] = inside * 255
    return images, labels


def synthetic_batches(batch_size: int, device: torch.device, seed: int = 0):
    """The silhouettes as a train.data TensorBatches (the animal-mnist code path)."""
    from train.data import EpochSampler, TensorBatches

    images, labels = synthetic_silhouettes(seed=seed)
    x = torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0)[:, None]  # [N, 1, 32, 32]
    sampler = EpochSampler(len(labels), batch_size, seed=seed, hflip=True)
    return TensorBatches(x, torch.from_numpy(labels), sampler, NUM_CLASSES, device)


def last_records(metrics_path: str, n: int = 5) -> list[dict[str, Any]]:
    if not os.path.exists(metrics_path):
        return []
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [r for r in rows if r.get("event") == "train"][-n:]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from train.config import load_config
    from train.distributed import resolve_device, shutdown_distributed
    from train.loop import train

    device = resolve_device("auto").type
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="sddit-train-short-")
    overrides = [f'run.dir="{run_dir}"', f"run.device=\"{device}\"",
                 f"schedule.total_steps={args.steps}", f"schedule.max_minutes={args.minutes}",
                 *args.overrides]
    cfg = load_config(args.config, overrides)
    batches = synthetic_batches(cfg.schedule.batch_size, torch.device(device), cfg.run.seed)
    try:
        result = train(cfg, batches=batches, fresh=True)
    finally:
        shutdown_distributed()
    return {"status": "complete", "device": device, "run_dir": run_dir,
            "data": "synthetic silhouettes shaped like animal-mnist (bench/train_short.py)",
            "model": cfg.model.name, "batch_size": cfg.schedule.batch_size,
            "steps": result.step, "stopped_by": result.stopped_by,
            "final_loss": result.final_loss, "skipped_steps": result.skipped_steps,
            "checkpoint": result.checkpoint, "sample_grid": result.sample_grid,
            "last_train_records": last_records(result.metrics)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train_short", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.toml")
    parser.add_argument("--minutes", type=float, default=0.5, help="wall-clock budget")
    parser.add_argument("--steps", type=int, default=300, help="at most this many steps")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override, as for sddit train")
    parser.add_argument("--run-dir", default=None, help="default: a new temporary folder")
    parser.add_argument("--gpu-only", action="store_true",
                        help="without CUDA, say 'no GPU' and exit 0")
    parser.add_argument("--out", default="bench-out/train_short.json")
    args = parser.parse_args(argv)
    if args.minutes < 0 or args.steps < 1:
        parser.error(f"--minutes must be >= 0 and --steps >= 1, got {args.minutes}, {args.steps}")
    if not os.path.isfile(args.config):
        parser.error(f"--config: no such file {args.config!r}")
    payload: dict[str, Any] = {"env": environment()}
    if args.gpu_only and not torch.cuda.is_available():
        print("bench.train_short: no GPU (no CUDA device); nothing trained.")
        write_json(args.out, {**payload, "status": "no GPU"})
        return 0
    write_json(args.out, {**payload, "status": "running"})
    payload.update(run(args))
    write_json(args.out, payload)
    rec = (payload["last_train_records"] or [{}])[-1]
    print(f"bench.train_short: {payload['steps']} steps on {payload['device']} "
          f"({payload['stopped_by']}); last {rec.get('images_per_s', float('nan')):.0f} img/s, "
          f"loss {payload['final_loss']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
