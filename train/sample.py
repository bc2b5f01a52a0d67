"""Sampling from a trained net: class-row grids for the run folder and `sddit sample`."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from train.config import UsageError
from train.execution import accelerated_denoiser, add_sampling_arguments
from train.logging_utils import save_image_grid, to_uint8_images

# A latent run's VAE decode (train.data.vae.LatentDecoder): samples -> pixels in [-1, 1].
Decode = Callable[[torch.Tensor], torch.Tensor]


def grid_classes(num_classes: int, max_rows: int = 10) -> list[int]:
    """Up to `max_rows` classes spread evenly over the label range."""
    rows = min(num_classes, max_rows)
    return sorted({round(i * (num_classes - 1) / max(rows - 1, 1)) for i in range(rows)})


@torch.no_grad()
def generate(net: nn.Module, labels: list[int], seeds: list[int], *, num_steps: int = 18,
             cfg_scale: float = 1.0, batch_size: int = 256, progress: bool = False
             ) -> torch.Tensor:
    """EDM Heun samples float32 [N, C, H, W] in about [-1, 1]; one seed per image, so an
    image does not depend on the batch it was drawn in."""
    import model

    if len(labels) != len(seeds):
        raise ValueError(f"labels and seeds must have the same length, got "
                         f"{len(labels)} and {len(seeds)}")
    device = next(net.parameters()).device
    chunks = []
    for start in range(0, len(labels), batch_size):
        y = torch.tensor(labels[start:start + batch_size], dtype=torch.long, device=device)
        chunks.append(model.edm_sample(net, y, seeds[start:start + batch_size],
                                       num_steps=num_steps, cfg_scale=cfg_scale,
                                       progress=progress).float().cpu())
    return torch.cat(chunks)


def as_images(samples: torch.Tensor, decode: Decode | None) -> torch.Tensor:
    """A run's samples as pixels in [-1, 1]: through its VAE for a latent run."""
    return samples if decode is None else decode(samples)


def class_grid(net: nn.Module, num_classes: int, per_class: int, path: str, *,
               num_steps: int = 18, cfg_scale: float = 1.0, seed: int = 0,
               decode: Decode | None = None) -> str:
    """A PNG with one row per class (up to 10 classes) and `per_class` samples per row;
    `decode` turns a latent run's samples into images."""
    classes = grid_classes(num_classes)
    labels = [c for c in classes for _ in range(per_class)]
    seeds = [seed + i for i in range(len(labels))]
    images = as_images(generate(net, labels, seeds, num_steps=num_steps, cfg_scale=cfg_scale),
                       decode)
    scale = 2 if images.shape[-1] <= 64 else 1
    return save_image_grid(images, path, ncols=per_class, scale=scale)


def add_sample_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sample", help="sample a checkpoint: PNG grid + .npz batch",
                              description="Draws class-conditional samples from a checkpoint's "
                              "sampling EMA with the EDM Heun sampler.")
    p.add_argument("--ckpt", required=True, help="checkpoint file, or a run folder (its newest)")
    p.add_argument("--num", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--classes", type=int, nargs="*", default=None,
                   help="labels to draw, cycled (default: all classes in turn)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance")
    p.add_argument("--steps", type=int, default=18, help="Heun steps (default 18)")
    p.add_argument("--seed", type=int, default=0, help="first seed; image i uses seed+i")
    p.add_argument("--batch", type=int, default=256, help="images per sampler call")
    p.add_argument("--out", default=None, help="output folder (default: <run>/samples)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--vae", default=None,
                   help="latent runs: the AutoencoderKL folder that decodes the samples "
                        "(default: the one the run recorded; for a run moved elsewhere)")
    add_sampling_arguments(p)


def check_sample_args(args: argparse.Namespace) -> None:
    """Before any work: every number in range, the checkpoint path there."""
    for name in ("num", "steps", "batch"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if not math.isfinite(args.cfg_scale) or args.cfg_scale < 0:
        raise UsageError(f"--cfg-scale must be a finite number >= 0 (1 = no guidance), got "
                         f"{args.cfg_scale}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if not os.path.exists(args.ckpt):
        raise UsageError(f"--ckpt {args.ckpt}: no such checkpoint file or run folder")
    if args.vae is not None and not os.path.isdir(args.vae):
        raise UsageError(f"--vae {args.vae}: no such folder (a saved diffusers AutoencoderKL)")


def checkpoint_decoder(meta: dict, vae: str | None, device: torch.device) -> Decode | None:
    """The VAE decode of a latent run's samples (None for a pixel run), loaded before any
    sampling; a VAE that cannot be reached or loaded is a UsageError naming --vae."""
    from train.data.latents import run_decoder

    data = meta["config"].get("data", {})
    if vae is not None and data.get("source") != "latents":
        raise UsageError(f"--vae {vae}: this run was trained on {data.get('source')!r} pixels, "
                         "whose samples are images already; --vae is for latent runs")
    try:
        return run_decoder(data, device, recorded=meta.get("latents"), override=vae,
                           flag="--vae PATH")
    except (OSError, ImportError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def run_sample(args: argparse.Namespace) -> int:
    from train.checkpoint import load_sampling_model
    from train.distributed import resolve_device

    check_sample_args(args)
    device = resolve_device(args.device)
    net, meta = load_sampling_model(args.ckpt, device)
    decode = checkpoint_decoder(meta, args.vae, device)
    net = accelerated_denoiser(net, args.precision, args.compile, args.num)
    num_classes = int(net.config.num_classes)
    classes = args.classes if args.classes else list(range(num_classes))
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
        raise UsageError(f"--classes {bad} out of range for {num_classes} classes")
    labels = [classes[i % len(classes)] for i in range(args.num)]
    seeds = [args.seed + i for i in range(args.num)]
    images = as_images(generate(net, labels, seeds, num_steps=args.steps,
                                cfg_scale=args.cfg_scale, batch_size=args.batch, progress=True),
                       decode)
    out = args.out or os.path.join(os.path.dirname(meta["path"]), "samples")
    os.makedirs(out, exist_ok=True)
    stem = f"step{meta['step']:08d}_cfg{args.cfg_scale:g}_n{args.num}"
    grid = save_image_grid(images, os.path.join(out, stem + ".png"),
                           ncols=len(classes) if len(classes) <= 16 else 16,  # a class a column
                           scale=2 if images.shape[-1] <= 64 else 1)
    npz = os.path.join(out, stem + ".npz")
    # ADM's evaluator layout: arr_0 uint8 [N, H, W, C], arr_1 labels.
    np.savez(npz, arr_0=to_uint8_images(images), arr_1=np.asarray(labels, dtype=np.int64))
    print(f"sampled {args.num} images from {meta['path']} (step {meta['step']})")
    print(f"  grid: {grid}\n  npz:  {npz}")
    return 0
