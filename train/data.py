"""Training data: the embedded animal-mnist set, image folders and precomputed latent shards.

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

import io
import multiprocessing
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image

SOURCES = ("animal-mnist", "image-folder", "latents")
BACKENDS = ("auto", "dali", "torch")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclass
class DataConfig:
    source: str = "animal-mnist"  # "animal-mnist" | "image-folder" | "latents"
    path: str = ""  # image folder root or latent index dir
    resolution: int = 32  # image-folder: ADM centre-crop size
    hflip: bool = True
    backend: str = "auto"  # "auto" | "dali" | "torch"
    num_workers: int = 2
    on_corrupt: str = "error"  # "error" | "skip"
    latent_scale: float | None = None  # None: the index's recorded scale

    def validate(self, check_paths: bool = True) -> None:
        """Values always; whether data.path exists only with check_paths (a config can be
        read and checked on a machine that does not hold its data)."""
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {SOURCES}, got {self.source!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"data.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.on_corrupt not in ("error", "skip"):
            raise ValueError(f"data.on_corrupt must be 'error' or 'skip', got {self.on_corrupt!r}")
        if not isinstance(self.resolution, int) or self.resolution < 1:
            raise ValueError(f"data.resolution must be a positive int, got {self.resolution!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ValueError(f"data.num_workers must be an int >= 0, got {self.num_workers!r}")
        if self.latent_scale is not None and not self.latent_scale > 0:
            raise ValueError(f"data.latent_scale must be > 0 or None, got {self.latent_scale!r}")
        if self.source != "animal-mnist" and not self.path:
            raise ValueError(f"data.path is required for data.source={self.source!r}")
        if check_paths and self.source != "animal-mnist" and not os.path.isdir(self.path):
            raise FileNotFoundError(f"data.path {self.path!r} is not a directory")


class CorruptImageError(OSError):
    """An image that cannot be read or decoded; `path` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = path


class BatchSource(Protocol):
    num_samples: int
    in_channels: int
    resolution: int
    num_classes: int
    backend: str

    def set_epoch(self, epoch: int) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


# ----------------------------------------------------------------------------- sampler
class EpochSampler:
    """The per-rank batches of one epoch: (indices int64 [steps, B], flips bool [steps, B])."""

    def __init__(self, num_samples: int, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, hflip: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, "
                             f"world_size={world_size}")
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of "
                             f"{batch_size} x {world_size} ranks = {global_batch}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.hflip = rank, world_size, seed, hflip
        self.steps_per_epoch = num_samples // global_batch
        self.dropped_per_epoch = num_samples - self.steps_per_epoch * global_batch

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.num_samples)  # [N], the same on every rank
        flip_of_sample = rng.random(self.num_samples) < 0.5  # [N], indexed by sample id
        used = self.steps_per_epoch * self.batch_size * self.world_size
        slots = order[:used].reshape(self.steps_per_epoch, self.world_size, self.batch_size)
        indices = slots[:, self.rank]  # [steps, B]
        flips = flip_of_sample[indices] & self.hflip  # [steps, B]
        return indices, flips

    def dropped(self, epoch: int) -> np.ndarray:
        """The sample ids left out of `epoch` by drop_last (for tests and reporting)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return order[self.num_samples - self.dropped_per_epoch:]


# ----------------------------------------------------------------------------- image folders
@dataclass
class ImageFolder:
    paths: list[str]
    labels: np.ndarray  # int64 [N]
    class_names: list[str]


def list_image_folder(root: str) -> ImageFolder:
    """`root/<class>/<image>`: classes sorted by name give label ids; files sorted by name."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} is not a directory")
    class_names = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not class_names:
        raise ValueError(f"image folder {root!r} has no class sub-folders (root/<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        for file in sorted(os.listdir(os.path.join(root, name))):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(root, name, file))
                labels.append(label)
    if not paths:
        raise ValueError(f"image folder {root!r} has no images with extensions {IMAGE_EXTENSIONS}")
    return ImageFolder(paths, np.asarray(labels, dtype=np.int64), class_names)


@dataclass(frozen=True)
class CropPlan:
    halvings: tuple[tuple[int, int], ...]  # (w, h) after each BOX halving
    resized: tuple[int, int]  # (w, h) after the BICUBIC resize
    anchor: tuple[int, int]  # (top, left) of the size x size crop


def adm_crop_plan(width: int, height: int, size: int) -> CropPlan:
    """ADM's centre crop: halve with BOX while the short side is >= 2*size, resize with
    BICUBIC so the short side is `size`, then take the centred size x size window."""
    halvings = []
    while min(width, height) >= 2 * size:
        width, height = width // 2, height // 2
        halvings.append((width, height))
    scale = size / min(width, height)
    resized = (round(width * scale), round(height * scale))
    anchor = ((resized[1] - size) // 2, (resized[0] - size) // 2)
    return CropPlan(tuple(halvings), resized, anchor)


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """PIL image -> uint8 [size, size, 3]."""
    plan = adm_crop_plan(*image.size, size)
    for box_size in plan.halvings:
        image = image.resize(box_size, resample=Image.BOX)
    image = image.resize(plan.resized, resample=Image.BICUBIC)
    top, left = plan.anchor
    return np.asarray(image)[top:top + size, left:left + size]


def decode_image(path: str, size: int) -> np.ndarray:
    """Reads, decodes and ADM-crops one file: uint8 [size, size, 3]; CorruptImageError if not."""
    try:
        with open(path, "rb") as f:
            image = Image.open(io.BytesIO(f.read()))
            image = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(path, f"{type(exc).__name__}: {exc}") from exc
    return adm_center_crop(image, size)


def find_corrupt(paths: Sequence[str], num_workers: int = 2, progress: bool = True) -> list[str]:
    """Decodes every file once (threads: PIL decodes without the GIL); returns the bad ones."""
    from tqdm.auto import tqdm

    def is_bad(path: str) -> bool:
        try:
            with Image.open(path) as image:
                image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError):
            return True
        return False

    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        flags = list(tqdm(pool.map(is_bad, paths), total=len(paths), desc="checking images",
                          disable=not progress or None, leave=False))
    return [p for p, bad in zip(paths, flags, strict=True) if bad]


def usable_images(root: str, on_corrupt: str, num_workers: int) -> tuple[ImageFolder, list[str]]:
    """The folder's images, less the unreadable ones when on_corrupt == "skip"."""
    folder = list_image_folder(root)
    if on_corrupt != "skip":
        return folder, []
    skipped = find_corrupt(folder.paths, num_workers)
    if skipped:
        bad = set(skipped)
        keep = [i for i, p in enumerate(folder.paths) if p not in bad]
        folder = ImageFolder([folder.paths[i] for i in keep], folder.labels[keep],
                             folder.class_names)
        warnings.warn(f"skipping {len(skipped)} unreadable image(s) in {root}: "
                      f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}",
                      stacklevel=2)
    return folder, skipped


class ImageFolderDataset(torch.utils.data.Dataset):
    """Item (index, flip) -> (uint8 [3, size, size], label)."""

    def __init__(self, folder: ImageFolder, size: int):
        self.folder, self.size = folder, size

    def __len__(self) -> int:
        return len(self.folder.paths)

    def __getitem__(self, item: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, flip = item
        pixels = decode_image(self.folder.paths[index], self.size)  # [H, W, 3]
        if flip:
            pixels = pixels[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))), int(
            self.folder.labels[index])


# ----------------------------------------------------------------------------- latent sampling
def sample_latents(moments: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """moments [B, 2C, h, w] -> scale * (mean + exp(logvar / 2) * eps): float32 [B, C, h, w]."""
    mean, logvar = moments.float().chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)  # as diffusers' DiagonalGaussianDistribution
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + torch.exp(0.5 * logvar) * eps) * scale


def noise_generator(seed: int, epoch: int, rank: int, step: int, device: torch.device
                    ) -> torch.Generator:
    """The latent-sampling noise of one batch: the same on both backends, and after a resume."""
    entropy = [seed, epoch, rank, step, 0x1A7E]
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(state) & (2**63 - 1))


# ----------------------------------------------------------------------------- batch sources
class SourceBase:
    """What both backends share: the sampler, sizes and the final to-model-range step."""

    backend = "torch"

    def __init__(self, sampler: EpochSampler, *, in_channels: int, resolution: int,
                 num_classes: int, device: torch.device, latent_scale: float | None = None,
                 skipped: Sequence[str] = ()):
        self.sampler, self.device = sampler, device
        self.num_samples = sampler.num_samples
        self.in_channels, self.resolution, self.num_classes = in_channels, resolution, num_classes
        self.latent_scale = latent_scale  # None for pixel sources
        self.skipped = list(skipped)
        self.dropped_per_epoch = sampler.dropped_per_epoch
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The next iteration yields `epoch` from `start_step` on (a mid-epoch resume)."""
        if not 0 <= start_step <= self.sampler.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.sampler.steps_per_epoch}], "
                             f"got {start_step}")
        self.epoch, self.start_step = int(epoch), int(start_step)

    def _epoch_plan(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's (indices [steps, B], flips [steps, B]) from start_step on."""
        indices, flips = self.sampler.epoch(self.epoch)
        return indices[self.start_step:], flips[self.start_step:]

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    def close(self) -> None:
        """Releases worker processes or pipelines (a source without any has nothing to do)."""

    def _finish(self, x: torch.Tensor, y: torch.Tensor, step: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: uint8 pixels, float [-1, 1] pixels or latent moments; -> model range on device."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True).long().reshape(-1)
        if self.latent_scale is not None:
            generator = noise_generator(self.sampler.seed, self.epoch, self.sampler.rank, step,
                                        self.device)
            return sample_latents(x, self.latent_scale, generator), y
        if x.dtype == torch.uint8:
            x = x.float() / 127.5 - 1.0
        return x.float(), y


class TensorBatches(SourceBase):
    """A data set held in memory as one tensor (animal-mnist)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, sampler: EpochSampler,
                 num_classes: int, device: torch.device):
        super().__init__(sampler, in_channels=images.shape[1], resolution=images.shape[-1],
                         num_classes=num_classes, device=device)
        self.images = images.to(device)  # float32 [N, C, H, W] in [-1, 1]
        self.labels = labels.to(device)  # int64 [N]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices, flips = self._epoch_plan()
        for step_indices, step_flips in zip(indices, flips, strict=True):
            ids = torch.from_numpy(step_indices).to(self.device)
            x = self.images[ids]
            flip = torch.from_numpy(step_flips).to(self.device)[:, None, None, None]
            yield torch.where(flip, x.flip(-1), x), self.labels[ids]


class _EpochBatchSampler(torch.utils.data.Sampler):
    """Lists of (index, flip) for the owner's current epoch, for a torch DataLoader."""

    def __init__(self, owner: SourceBase):
        self.owner = owner

    def __len__(self) -> int:
        return self.owner.sampler.steps_per_epoch - self.owner.start_step

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        indices, flips = self.owner._epoch_plan()
        for step_indices, step_flips in zip(indices, flips, strict=True):
            yield list(zip(step_indices.tolist(), step_flips.tolist(), strict=True))


# Worker processes start from a clean forkserver, never by forking this process: a forked
# worker inherits whatever the parent holds (a live DALI pipeline, CUDA state, other
# threads' locks) without the threads that own it, and the first garbage collection in
# the worker can then block for ever (seen: DALI's Pipeline.__del__ in a worker, a hung
# test suite). Workers persist across epochs, so the start-up cost (importing torch) is
# paid once per source; close() stops them.
WORKER_START_METHOD = "forkserver"


class LoaderBatches(SourceBase):
    """A map-style dataset read through a torch DataLoader driven by the epoch sampler."""

    def __init__(self, dataset: torch.utils.data.Dataset, sampler: EpochSampler, *,
                 num_workers: int, **kwargs):
        super().__init__(sampler, **kwargs)
        workers = {}
        if num_workers > 0:
            context = multiprocessing.get_context(WORKER_START_METHOD)
            # The server imports this module (torch, numpy, PIL) once; each worker is then
            # a cheap fork of that clean process. Takes effect when the server first starts.
            context.set_forkserver_preload([__name__])
            workers = dict(multiprocessing_context=context, persistent_workers=True)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=_EpochBatchSampler(self), num_workers=num_workers,
            pin_memory=torch.device(self.device).type == "cuda", **workers)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, (x, y) in enumerate(self.loader, start=self.start_step):
            yield self._finish(x, y, step)

    def close(self) -> None:
        """Stops the persistent workers now rather than at interpreter exit."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None


def _choose_backend(cfg: DataConfig) -> str:
    supports_dali = cfg.source in ("image-folder", "latents")
    if cfg.backend == "torch" or (cfg.backend == "auto" and not supports_dali):
        return "torch"
    from train import dali_pipelines

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
        from train import animal_mnist

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
            from train.dali_pipelines import DaliImageBatches

            return DaliImageBatches(folder, sampler, cfg.resolution, cfg.num_workers, **sizes)
        return LoaderBatches(ImageFolderDataset(folder, cfg.resolution), sampler,
                             num_workers=cfg.num_workers, **sizes)

    from train.latents import LatentDataset, LatentShards

    shards = LatentShards(cfg.path)
    sampler = EpochSampler(len(shards), batch_size, rank=rank, world_size=world_size,
                           seed=seed, hflip=hflip)
    two_c, h, w = shards.moment_shape
    if h != w:
        raise ValueError(f"{cfg.path}: latents must be square, index has {h}x{w}")
    sizes = dict(in_channels=two_c // 2, resolution=h, num_classes=len(shards.class_names),
                 device=device, latent_scale=cfg.latent_scale or shards.scale)
    if backend == "dali":
        from train.dali_pipelines import DaliLatentBatches

        return DaliLatentBatches(shards, sampler, cfg.num_workers, **sizes)
    return LoaderBatches(LatentDataset(shards), sampler, num_workers=cfg.num_workers, **sizes)
