"""The epoch sampler both data backends take their order from (see train/data/__init__.py
for the epoch semantics)."""

from __future__ import annotations

import numpy as np


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


