"""Batch sources: the data config, what both backends share, in-memory tensors and torch
DataLoader sources, and drawing latent samples from stored VAE moments."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from train.data.sampler import EpochSampler

SOURCES = ("animal-mnist", "image-folder", "latents")
BACKENDS = ("auto", "dali", "torch")


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
    # latents: the AutoencoderKL folder that decodes samples into images ("": the one the
    # latent index records). Used only to look at samples, so it may change on resume.
    vae: str = ""

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
        if not isinstance(self.vae, str):
            raise ValueError(f"data.vae must be a folder path (a string), got {self.vae!r}")
        if self.source != "animal-mnist" and not self.path:
            raise ValueError(f"data.path is required for data.source={self.source!r}")
        if check_paths and self.source != "animal-mnist" and not os.path.isdir(self.path):
            raise FileNotFoundError(f"data.path {self.path!r} is not a directory")


class BatchSource(Protocol):
    num_samples: int
    in_channels: int
    resolution: int
    num_classes: int
    backend: str

    def set_epoch(self, epoch: int) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


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


def worker_options(num_workers: int, persistent: bool) -> dict:
    """DataLoader arguments that start workers from the clean forkserver (see above)."""
    if num_workers == 0:
        return {}
    context = multiprocessing.get_context(WORKER_START_METHOD)
    # The server imports the data layer (torch, numpy, PIL) once; each worker is then a
    # cheap fork of that clean process. Takes effect when the server first starts.
    context.set_forkserver_preload(["train.data"])
    return dict(multiprocessing_context=context, persistent_workers=persistent)


class LoaderBatches(SourceBase):
    """A map-style dataset read through a torch DataLoader driven by the epoch sampler."""

    def __init__(self, dataset: torch.utils.data.Dataset, sampler: EpochSampler, *,
                 num_workers: int, **kwargs):
        super().__init__(sampler, **kwargs)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=_EpochBatchSampler(self), num_workers=num_workers,
            pin_memory=torch.device(self.device).type == "cuda",
            **worker_options(num_workers, persistent=True))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, (x, y) in enumerate(self.loader, start=self.start_step):
            yield self._finish(x, y, step)

    def close(self) -> None:
        """Stops the persistent workers now rather than at interpreter exit."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None


