"""`sddit prepare-latents`: the command line over train.data.latents.prepare_latents. It
lives here, in the CLI layer, because it joins torchrun's process group on the device
train.distributed decides (the data layer imports nothing from train)."""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from train.data.latents import prepare_latents
from train.data.shard_work import rank_world


def add_prepare_latents_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prepare-latents", help="encode an image folder into sharded VAE latents",
        description="Encode root/<class>/<image> with a local diffusers AutoencoderKL into "
                    "sharded .npy latent moments (and flipped copies) plus index.json. Under "
                    "torchrun every rank encodes its share of the shards; rerunning an "
                    "interrupted command continues from its finished shards.")
    parser.add_argument("image_folder", help="image folder root/<class>/<image>")
    parser.add_argument("out_dir", help="output folder for the shards and index.json")
    parser.add_argument("--vae", required=True, dest="vae_path",
                        help="local folder of a diffusers AutoencoderKL (e.g. a saved copy of "
                             "stabilityai/sd-vae-ft-ema)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=8192,
                        help="images per shard: the unit of work shared by ranks and of resume")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--scale", type=float, default=None,
                        help="latent scale to record (default: the VAE config's)")
    parser.add_argument("--device", default="auto",
                        help="auto | cpu | cuda (auto: cuda if available, else cpu)")
    parser.add_argument("--on-corrupt", choices=("error", "skip"), default="error")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an out_dir that holds an index or shards")
    parser.set_defaults(func=run_prepare_latents)
    return parser


def _join_torchrun(device_arg: str) -> tuple[torch.device, bool]:
    """Under torchrun (WORLD_SIZE > 1): join its process group on this rank's device
    (train.distributed decides, as for training). Returns (device, whether this call made
    the group)."""
    from train.distributed import init_distributed

    was_joined = dist.is_initialized()
    info = init_distributed(device_arg, what="--device")
    return info.device, dist.is_initialized() and not was_joined


def run_prepare_latents(args: argparse.Namespace) -> int:
    """The CLI entry: a bad argument or path is reported in one line, exit status 2."""
    try:
        device, joined = _join_torchrun(args.device)
    except (ValueError, RuntimeError) as exc:
        print(f"sddit prepare-latents: {exc}", file=sys.stderr)
        return 2
    try:
        index = prepare_latents(
            args.image_folder, args.out_dir, vae_path=args.vae_path, scale=args.scale,
            resolution=args.resolution, batch_size=args.batch_size, shard_size=args.shard_size,
            dtype=args.dtype, device=device, on_corrupt=args.on_corrupt,
            num_workers=args.num_workers, overwrite=args.overwrite)
    except (OSError, ImportError, ValueError) as exc:  # OSError covers CorruptImageError
        print(f"sddit prepare-latents: {exc}", file=sys.stderr)
        return 2
    finally:
        rank = rank_world()[0]
        if joined:
            dist.destroy_process_group()
    if rank == 0:
        print(f"prepare-latents: wrote {index['count']} latents {index['latent_shape']} in "
              f"{len(index['shards'])} shard(s) to {args.out_dir}")
    return 0
