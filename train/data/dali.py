"""NVIDIA DALI pipelines for image folders and latent shards.

Both are fed by `fn.external_source` from the shared `EpochSampler`, not by DALI's own
readers: `fn.readers.file` shuffles through a buffer, and per rank, so it cannot give the
exact-once epochs and the per-epoch global permutation that the torch backend gives. With the
sampler feeding both, the two backends yield the same batches in the same order.

- Image folder: encoded bytes -> `fn.decoders.image` (device "mixed" with a GPU, "cpu" with
  `device_id=None`) -> one antialiased cubic resize to ADM's resized size -> ADM's centre
  crop -> `fn.flip` by the sampler's flips -> normalise to [-1, 1], CHW.
  (ADM halves with BOX before its BICUBIC resize; DALI does it in one antialiased resize.
  The difference is bounded in tests/test_dali.py.)
- Latents: the moments of each sample (its stored flipped copy when flipped) -> the device;
  the latent is then drawn from them by the same torch code as the torch backend.
"""

from __future__ import annotations

import functools
import importlib.util
import io
from collections import deque
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from train.data.images import CorruptImageError, ImageFolder, adm_crop_plan, decode_image
from train.data.latents import LatentShards
from train.data.sampler import EpochSampler
from train.data.sources import SourceBase


@functools.cache
def dali_available() -> bool:
    """Whether DALI and its torch plugin import (a broken install counts as absent)."""
    try:
        if importlib.util.find_spec("nvidia.dali") is None:
            return False
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except (ImportError, OSError, RuntimeError):
        return False
    return True


def _device_id(device: torch.device) -> int | None:
    """DALI's device_id: the CUDA index, or None for a CPU-only pipeline."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def image_folder_pipeline(source, batch_size: int, size: int, num_threads: int,
                          device_id: int | None, seed: int = 0):
    """`source` yields batches (encoded, labels, flips, resized_hw, anchor_hw)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def pipeline():
        encoded, labels, flips, resized_hw, anchor_hw = fn.external_source(
            source=source, num_outputs=5, cycle="raise", batch=True,
            dtype=[types.UINT8, types.INT64, types.INT32, types.FLOAT, types.FLOAT])
        images = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed",
                                   output_type=types.RGB)  # [H, W, 3] uint8
        images = fn.resize(images, size=resized_hw, interp_type=types.INTERP_CUBIC,
                           antialias=True)
        images = fn.slice(images, anchor_hw, np.array([size, size], np.float32),
                          axis_names="HW", normalized_anchor=False, normalized_shape=False)
        images = fn.flip(images, horizontal=flips)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[127.5] * 3, std=[127.5] * 3)
        return images, labels

    return pipeline()


def latent_pipeline(source, batch_size: int, num_threads: int, device_id: int | None,
                    seed: int = 0):
    """`source` yields batches (moments [2C, h, w] per sample, labels)."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                  prefetch_queue_depth=2)
    def pipeline():
        moments, labels = fn.external_source(source=source, num_outputs=2, cycle="raise",
                                             batch=True, layout=["CHW", ""])
        if device_id is not None:
            moments = moments.gpu()
        return moments, labels

    return pipeline()


class _DaliBatches(SourceBase):
    """Runs a DALI pipeline fed by the epoch sampler, wrapped in DALIGenericIterator.

    The feeding generator reads the epoch on its first batch, which DALI requests only after
    `reset()`; so `set_epoch(e)` before `iter()` always takes effect, prefetching included.
    An epoch left unfinished (or failed) rebuilds the pipeline, since DALI cannot reset then.
    """

    backend = "dali"

    def __init__(self, sampler: EpochSampler, num_workers: int, **kwargs):
        super().__init__(sampler, **kwargs)
        self.num_threads = max(1, num_workers)
        self._iterator = None
        self._finished_epoch = False
        self._fed: deque[list[int]] = deque(maxlen=4)  # indices of the latest batches fed

    def _batches(self) -> Iterator[tuple]:
        indices, flips = self._epoch_plan()
        for step_indices, step_flips in zip(indices, flips, strict=True):
            self._fed.append(step_indices.tolist())
            yield self._feed(step_indices, step_flips)

    def _feed(self, indices: np.ndarray, flips: np.ndarray) -> tuple:
        raise NotImplementedError

    def _pipeline(self):
        raise NotImplementedError

    def _explain(self, exc: Exception) -> Exception:
        return exc

    def close(self) -> None:
        """Ends the pipeline's life now (its threads and buffers), not whenever the garbage
        collector gets to it; the next epoch builds a new one."""
        iterator, self._iterator = self._iterator, None
        self._finished_epoch = False
        if iterator is not None:
            for pipe in getattr(iterator, "_pipes", []):
                pipe._shutdown()
            del iterator

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if self.start_step == self.sampler.steps_per_epoch:
            return  # resumed at the very end of an epoch: nothing left to run
        try:
            if self._iterator is not None and self._finished_epoch:
                self._iterator.reset()
            else:  # first use, or the last epoch was abandoned: DALI can only reset at its end
                self._iterator = None  # its constructor already runs the first batch: build lazily
                pipe = self._pipeline()
                pipe.build()
                self._iterator = DALIGenericIterator([pipe], ["x", "y"], auto_reset=False,
                                                     last_batch_policy=LastBatchPolicy.DROP)
            self._finished_epoch = False
            for step, outputs in enumerate(self._iterator, start=self.start_step):
                yield self._finish(outputs[0]["x"], outputs[0]["y"], step)
            self._finished_epoch = True
        except Exception as exc:  # DALI reports decode failures without the path
            explained = self._explain(exc)
            if explained is exc:
                raise
            raise explained from exc


class DaliImageBatches(_DaliBatches):
    def __init__(self, folder: ImageFolder, sampler: EpochSampler, size: int, num_workers: int,
                 **kwargs):
        super().__init__(sampler, num_workers, **kwargs)
        self.folder, self.size = folder, size
        self._pool = None

    def _read(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Encoded bytes and ADM's resize/crop geometry (from the header) of one file."""
        path = self.folder.paths[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                width, height = image.size
        except (OSError, ValueError) as exc:
            raise CorruptImageError(path, f"{type(exc).__name__}: {exc}") from exc
        plan = adm_crop_plan(width, height, self.size)
        resized_hw = np.array(plan.resized[::-1], np.float32)
        encoded = np.frombuffer(data, dtype=np.uint8)
        return encoded, resized_hw, np.array(plan.anchor, np.float32)

    def _feed(self, indices: np.ndarray, flips: np.ndarray) -> tuple:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.num_threads)
        encoded, resized_hw, anchor_hw = zip(*self._pool.map(self._read, indices.tolist()),
                                             strict=True)
        labels = [np.array(label, np.int64) for label in self.folder.labels[indices]]
        flags = [np.array(flip, np.int32) for flip in flips]
        return list(encoded), labels, flags, list(resized_hw), list(anchor_hw)

    def _pipeline(self):
        return image_folder_pipeline(self._batches, self.sampler.batch_size, self.size,
                                     self.num_threads, _device_id(self.device), self.sampler.seed)

    def _explain(self, exc: Exception) -> Exception:
        if isinstance(exc, CorruptImageError):
            return exc
        for batch in self._fed:  # the failed batch is among the latest fed
            for index in batch:
                try:
                    decode_image(self.folder.paths[index], self.size)
                except CorruptImageError as corrupt:
                    return corrupt
        return exc


class DaliLatentBatches(_DaliBatches):
    def __init__(self, shards: LatentShards, sampler: EpochSampler, num_workers: int, **kwargs):
        super().__init__(sampler, num_workers, **kwargs)
        self.shards = shards

    def _feed(self, indices: np.ndarray, flips: np.ndarray) -> tuple:
        moments = [self.shards.get(i, f) for i, f in zip(indices.tolist(), flips.tolist(),
                                                          strict=True)]
        labels = [np.array(label, np.int64) for label in self.shards.labels[indices]]
        return moments, labels

    def _pipeline(self):
        return latent_pipeline(self._batches, self.sampler.batch_size, self.num_threads,
                               _device_id(self.device), self.sampler.seed)
