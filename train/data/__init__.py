"""Training data: the embedded animal-mnist set, image folders and precomputed latent shards.

Layer: sdkernels <- model <- **data** <- train, metrics <- bench <- sddit. It imports only
torch, numpy, PIL and (optionally) nvidia.dali; train and metrics import it. Modules:
`images` (image files, decode, ADM crop, corrupt files, the sample quantiser), `sampler`
(the epoch sampler), `sources` (the config and the torch batch sources), `latents` (shards
and `prepare-latents`), `dali` (the DALI pipelines), `animal_mnist`; this file holds
`build_batches`, which chooses among them.

Every source is consumed through `build_batches(cfg, batch_size, ...) -> BatchSource`, which
yields `(x float32 [B, C, H, W] on device, y int64 [B])` with x in the model's range:
[-1, 1] for pixels, scaled latent samples for latents.

Epoch semantics (both backends share `EpochSampler`):
- Each epoch is one permutation of all samples, seeded by (seed, epoch): it changes every
  epoch and is identical on every rank. Per-sample flip decisions come from the same seed.
- The permutation is cut into global batches of `batch_size * world_size`; rank r takes
  slot r of each. Every sample is seen at most once per epoch across all ranks, and exactly
  once except for the tail of `num_samples % (batch_size * world_size)` samples that do not
  fill a global batch (drop_last). The tail is a different random subset every epoch, and
  its size is reported as `BatchSource.dropped_per_epoch`.

Corrupt files: with `on_corrupt="error"` the first unreadable file stops the run with a
`CorruptImageError` naming its path. With `"skip"` every file is decoded once up front;
unreadable ones are left out of the epoch, counted and listed in `BatchSource.skipped`.
"""

from __future__ import annotations

import torch

from train.data.images import (
    IMAGE_EXTENSIONS,
    CorruptImageError,
    ImageFolder,
    ImageFolderDataset,
    adm_center_crop,
    adm_crop_plan,
    decode_image,
    find_corrupt,
    list_image_folder,
    samples_to_uint8,
    usable_images,
)
from train.data.sampler import EpochSampler
from train.data.sources import (
    BACKENDS,
    SOURCES,
    WORKER_START_METHOD,
    BatchSource,
    DataConfig,
    LoaderBatches,
    SourceBase,
    TensorBatches,
    noise_generator,
    sample_latents,
)


def _choose_backend(cfg: DataConfig) -> str:
    supports_dali = cfg.source in ("image-folder", "latents")
    if cfg.backend == "torch" or (cfg.backend == "auto" and not supports_dali):
        return "torch"
    from train.data import dali as dali_pipelines

    if cfg.backend == "dali":
        if not supports_dali:
            raise ValueError(f"data.backend='dali' does not support data.source={cfg.source!r} "
                             "(use 'auto' or 'torch')")
        if not dali_pipelines.dali_available():
            raise ImportError("data.backend='dali' but nvidia.dali is not importable: "
                              "pip install nvidia-dali-cuda130 (or -cuda120), or use 'torch'")
        return "dali"
    return "dali" if dali_pipelines.dali_available() else "torch"


def build_batches(cfg: DataConfig, batch_size: int, *, rank: int = 0, world_size: int = 1,
                  seed: int = 0, device: torch.device | str = "cpu", split: str = "train"
                  ) -> BatchSource:
    """The batches of `cfg`'s source for one rank; see the module docstring for epochs.

    split="test" (animal-mnist's held-out 1,000) turns flips off. Besides the BatchSource
    protocol, sources have `sampler`, `dropped_per_epoch`, `skipped` (paths left out by
    on_corrupt="skip") and `set_epoch(epoch, start_step=0)` for a mid-epoch resume.
    """
    cfg.validate()
    device = torch.device(device)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if split != "train" and cfg.source != "animal-mnist":
        raise ValueError(f"split={split!r} exists for animal-mnist only; for "
                         f"data.source={cfg.source!r} point data.path at the held-out data")
    hflip = cfg.hflip and split == "train"
    backend = _choose_backend(cfg)

    if cfg.source == "animal-mnist":
        from train.data import animal_mnist

        images, labels = animal_mnist.load_animal_mnist(split)
        sampler = EpochSampler(len(labels), batch_size, rank=rank, world_size=world_size,
                               seed=seed, hflip=hflip)
        return TensorBatches(torch.from_numpy(animal_mnist.to_model_range(images)),
                             torch.from_numpy(labels), sampler, animal_mnist.NUM_CLASSES, device)

    if cfg.source == "image-folder":
        folder, skipped = usable_images(cfg.path, cfg.on_corrupt, cfg.num_workers)
        sampler = EpochSampler(len(folder.paths), batch_size, rank=rank, world_size=world_size,
                               seed=seed, hflip=hflip)
        sizes = dict(in_channels=3, resolution=cfg.resolution,
                     num_classes=len(folder.class_names), device=device, skipped=skipped)
        if backend == "dali":
            from train.data.dali import DaliImageBatches

            return DaliImageBatches(folder, sampler, cfg.resolution, cfg.num_workers, **sizes)
        return LoaderBatches(ImageFolderDataset(folder, cfg.resolution), sampler,
                             num_workers=cfg.num_workers, **sizes)

    from train.data.latents import LatentDataset, LatentShards

    shards = LatentShards(cfg.path)
    sampler = EpochSampler(len(shards), batch_size, rank=rank, world_size=world_size,
                           seed=seed, hflip=hflip)
    two_c, h, w = shards.moment_shape
    if h != w:
        raise ValueError(f"{cfg.path}: latents must be square, index has {h}x{w}")
    sizes = dict(in_channels=two_c // 2, resolution=h, num_classes=len(shards.class_names),
                 device=device, latent_scale=cfg.latent_scale or shards.scale)
    if backend == "dali":
        from train.data.dali import DaliLatentBatches

        return DaliLatentBatches(shards, sampler, cfg.num_workers, **sizes)
    return LoaderBatches(LatentDataset(shards), sampler, num_workers=cfg.num_workers, **sizes)


__all__ = [
    "BACKENDS", "IMAGE_EXTENSIONS", "SOURCES", "WORKER_START_METHOD", "BatchSource",
    "CorruptImageError", "DataConfig", "EpochSampler", "ImageFolder", "ImageFolderDataset",
    "LoaderBatches", "SourceBase", "TensorBatches", "adm_center_crop", "adm_crop_plan",
    "build_batches", "decode_image", "find_corrupt", "list_image_folder", "noise_generator",
    "sample_latents", "samples_to_uint8", "usable_images",
]
