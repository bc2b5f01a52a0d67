"""The VAE of latent runs: diffusers' `AutoencoderKL`, loaded from a local folder, that
encodes images for `sddit prepare-latents` and decodes sampled latents back to images.

Decoding is the one way out of latent space: `sddit sample`, `sddit eval`, the training
loop's sample grids and `bench chart` all turn a latent run's samples into pixels through
`LatentDecoder` before they quantise them (`samples_to_uint8`). A sample z of the model is
a *scaled* latent (training drew `scale * (mean + std * eps)`, train/data/sources.py), so
the decoder divides by the scale first, as the DiT and EDM code do:

    pixels = clamp(AutoencoderKL.decode(z / scale), -1, 1)      # float32 [N, 3, H, W]

with H = h * 2^(len(block_out_channels) - 1) (8 for the SD VAE: 32x32 latents -> 256 px).
It runs in batches, in bfloat16 on CUDA (the SD VAE decodes well in bf16, unlike fp16,
which overflows) and float32 elsewhere, on the device of the latents it is given, so under
torchrun every rank decodes its own share of the samples.

Nothing is downloaded: the folder must hold a saved `AutoencoderKL` (config.json and
weights), e.g. `AutoencoderKL.from_pretrained("stabilityai/sd-vae-ft-ema").save_pretrained(
"sd-vae-ft-ema")` run once on a machine with network access. diffusers is the optional
extra `pip install sddit[latents]`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


class VaeUnavailableError(FileNotFoundError):
    """A latent run whose VAE folder cannot be reached: its samples cannot become images."""


@dataclass(frozen=True)
class VaeSpec:
    """Which VAE turns a latent run's samples into images, and the scale it trained at."""

    path: str  # local folder of a diffusers AutoencoderKL
    scale: float  # the run's samples are scale * latent

    def record(self) -> dict:
        return {"vae": self.path, "scale": self.scale}


def check_vae_folder(vae_path: str | None, what: str) -> None:
    """Raises VaeUnavailableError unless `vae_path` is a folder with a config.json; `what`
    names the argument or setting that gave the path, so the message says what to fix."""
    if not vae_path or not os.path.isdir(vae_path):
        raise VaeUnavailableError(
            f"{what} {vae_path!r} is not a local folder: give the folder of a diffusers "
            "AutoencoderKL (config.json and weights), e.g. a saved copy of "
            "stabilityai/sd-vae-ft-ema; nothing is downloaded")
    if not os.path.isfile(os.path.join(vae_path, "config.json")):
        raise VaeUnavailableError(f"{what} {vae_path!r} has no config.json: it is not a saved "
                                  "diffusers AutoencoderKL folder")


def load_autoencoder(vae_path: str, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32, what: str = "vae_path"):
    """diffusers AutoencoderKL from a local folder, in eval mode without gradients."""
    check_vae_folder(vae_path, what)
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        raise ImportError(f"the VAE at {vae_path} needs diffusers: pip install 'sddit[latents]' "
                          "(or pip install diffusers)") from exc
    # low_cpu_mem_usage=False: the default wants `accelerate`, which is not a dependency.
    vae = AutoencoderKL.from_pretrained(vae_path, local_files_only=True, torch_dtype=dtype,
                                        low_cpu_mem_usage=False)
    return vae.to(device).eval().requires_grad_(False)


def decode_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class LatentDecoder:
    """Scaled latents [N, C, h, w] -> pixels float32 [N, 3, H, W] in [-1, 1]: the VAE decode
    of `latents / scale`, `batch_size` images at a time, on the latents' device."""

    def __init__(self, spec: VaeSpec, device: torch.device | str, batch_size: int = 32,
                 what: str = "the VAE folder"):
        if not spec.scale > 0:
            raise ValueError(f"the latent scale must be > 0, got {spec.scale!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.spec, self.device = spec, torch.device(device)
        self.dtype = decode_dtype(self.device)
        self.batch_size = batch_size
        self.vae = load_autoencoder(spec.path, self.device, self.dtype, what)
        self.latent_channels = int(self.vae.config.latent_channels)

    def describe(self) -> dict:
        return {**self.spec.record(), "dtype": str(self.dtype).removeprefix("torch."),
                "batch_size": self.batch_size}

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels or not len(latents):
            raise ValueError(f"latents must be [N >= 1, {self.latent_channels}, h, w] for the "
                             f"VAE at {self.spec.path}, got {tuple(latents.shape)}")
        if not torch.is_floating_point(latents):
            raise TypeError(f"latents must be a float tensor, got {latents.dtype}")
        out = []
        for chunk in latents.split(self.batch_size):
            z = (chunk.to(self.device, torch.float32) / self.spec.scale).to(self.dtype)
            pixels = self.vae.decode(z).sample
            out.append(pixels.float().clamp(-1.0, 1.0).to(latents.device))
        return torch.cat(out)
