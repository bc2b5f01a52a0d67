"""What decoding a latent run's samples costs, and what it adds to FID-50K.

    python -m bench.decode_cost --vae /path/to/sd-vae-ft-ema            # 32x32 latents
    python -m bench.decode_cost --sd-vae-architecture --batch 2 --repeats 2
    python -m bench.decode_cost --vae vae/ --latent-size 8               # the test's miniature

Times `train.data.vae.LatentDecoder` (the path sample, eval, the loop and the chart use:
bf16 on CUDA, fp32 elsewhere) on random latents after one warm-up batch, counts the
decoder's FLOPs per image with torch's FlopCounterMode, and projects to 50,000 decodes:
seconds on this device, and the decode's share of the FLOPs of sampling DiT-XL/2 with EDM
Heun at 18 steps (35 network evaluations, no guidance, `model.flops_per_image`).
`--sd-vae-architecture` builds stabilityai/sd-vae-ft-ema's published configuration with
random weights (the timing and FLOPs do not depend on the weights), so the cost can be
measured where the real weights are not available.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import torch

# stabilityai/sd-vae-ft-ema's config.json (the DiT papers' VAE): 83.7M parameters.
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
    "block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32, "sample_size": 256,
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
}
FID_SAMPLES = 50_000
HEUN_EVALUATIONS = 35  # 18 EDM Heun steps: a correction on every step but the last


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--vae", help="local folder of a diffusers AutoencoderKL")
    source.add_argument("--sd-vae-architecture", action="store_true",
                        help="sd-vae-ft-ema's configuration with random weights")
    parser.add_argument("--latent-size", type=int, default=32, help="h = w of the latents")
    parser.add_argument("--batch", type=int, default=8, help="images per decode call")
    parser.add_argument("--repeats", type=int, default=3, help="timed batches after a warm-up")
    parser.add_argument("--device", default="auto",
                        help="auto | cpu | cuda (auto: cuda if available, else cpu)")
    parser.add_argument("--out", default=None, help="write the record here (JSON)")


def _check(args: argparse.Namespace) -> None:
    """Checks the arguments and resolves --device to a torch.device (train.distributed)."""
    from train.distributed import resolve_device

    for name in ("latent_size", "batch", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got "
                             f"{getattr(args, name)}")
    try:
        args.device = resolve_device(args.device, what="--device")
    except RuntimeError as exc:  # 'cuda' without a CUDA device: a bad argument here
        raise ValueError(str(exc)) from None


def decoder_flops(decoder, latent: torch.Tensor) -> float:
    """FLOPs of decoding one latent [1, C, h, w] (convolutions, matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        decoder(latent)
    return float(counter.get_total_flops())


def time_decoder(decoder, latents: torch.Tensor, repeats: int) -> float:
    """Median seconds per image over `repeats` decodes of the batch, after one warm-up."""
    from tqdm.auto import tqdm

    decoder(latents)
    times = []
    for _ in tqdm(range(repeats), desc="decode", unit="batch"):
        if latents.is_cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        decoder(latents)
        if latents.is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - started) / len(latents))
    return sorted(times)[len(times) // 2]


def projection(seconds_per_image: float, gflops_per_image: float) -> dict[str, float]:
    """50,000 decodes on this device, and their share of DiT-XL/2's sampling FLOPs."""
    import model

    sampling = HEUN_EVALUATIONS * model.flops_per_image(model.make_config("DiT-XL/2"),
                                                        train=False) / 1e9
    return {"samples": FID_SAMPLES, "decode_hours_here": FID_SAMPLES * seconds_per_image / 3600,
            "decode_gflops_per_image": gflops_per_image,
            "dit_xl2_sampling_gflops_per_image": sampling,
            "decode_share_of_flops": gflops_per_image / (gflops_per_image + sampling)}


def measure(vae_folder: str, args: argparse.Namespace) -> dict[str, Any]:
    from train.data.vae import LatentDecoder, VaeSpec

    decoder = LatentDecoder(VaeSpec(vae_folder, 0.18215), args.device, batch_size=args.batch)
    size = args.latent_size
    latents = torch.randn(args.batch, decoder.latent_channels, size, size, device=args.device)
    flops = decoder_flops(decoder, latents[:1])
    seconds = time_decoder(decoder, latents, args.repeats)
    image = decoder(latents[:1])
    return {"vae": vae_folder, "device": str(decoder.device), "dtype": decoder.describe()["dtype"],
            "threads": torch.get_num_threads(), "latent_shape": list(latents.shape[1:]),
            "image_shape": list(image.shape[1:]), "batch": args.batch, "repeats": args.repeats,
            "seconds_per_image": seconds, "images_per_s": 1 / seconds,
            "params": sum(p.numel() for p in decoder.vae.parameters()),
            "projection": projection(seconds, flops / 1e9)}


def run(args: argparse.Namespace) -> int:
    from bench._harness import environment, write_json

    try:
        _check(args)
        if args.sd_vae_architecture:
            from diffusers import AutoencoderKL

            with tempfile.TemporaryDirectory() as folder:
                AutoencoderKL(**SD_VAE_CONFIG).save_pretrained(folder)
                record = measure(folder, args)
            record["vae"] = "sd-vae-ft-ema architecture, random weights"
        else:
            record = measure(args.vae, args)
    except (OSError, ImportError, ValueError) as exc:
        print(f"bench.decode_cost: {exc}", file=sys.stderr)
        return 2
    record["environment"] = environment()
    p = record["projection"]
    print(f"decode {record['latent_shape']} -> {record['image_shape']} on {record['device']} "
          f"({record['dtype']}): {record['images_per_s']:.2f} images/s, "
          f"{p['decode_gflops_per_image']:.3g} GFLOP/image")
    print(f"FID-50K: {p['decode_hours_here']:.2f} h of decoding on this device; "
          f"{100 * p['decode_share_of_flops']:.1f}% of the FLOPs of sampling DiT-XL/2 "
          f"({p['dit_xl2_sampling_gflops_per_image']:.0f} GFLOP/image) plus decoding")
    if args.out:
        write_json(os.path.abspath(args.out), record)
    return 0


def main(argv: list[str] | None = None) -> int:
    from bench._harness import module_main

    return module_main("python -m bench.decode_cost", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
