"""DataLoader workers start clean, whatever the parent process holds.

The failure this guards against hung the whole suite: DALI pipelines created by earlier
tests were alive in the parent, a forked DataLoader worker inherited them without their
threads, and the garbage collector ran a pipeline's destructor inside the worker, which then
waited for ever. Here the worker collects garbage on every item, and the pipelines are
reachable only through reference cycles, so a worker that inherited them would run their
destructors.
"""

from __future__ import annotations

import gc

import pytest
import torch
from test_data import make_image_folder

from train.data import (
    WORKER_START_METHOD,
    DataConfig,
    EpochSampler,
    ImageFolderDataset,
    LoaderBatches,
    build_batches,
    list_image_folder,
)

pytestmark = pytest.mark.timeout(150)


class CollectingDataset(torch.utils.data.Dataset):
    """An image folder that runs the garbage collector in the worker before each item."""

    def __init__(self, inner: ImageFolderDataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, item):
        gc.collect()
        return self.inner[item]


def _dali_sources_in_cycles(root: str, count: int) -> None:
    for _ in range(count):
        source = build_batches(DataConfig(source="image-folder", path=root, resolution=16,
                                          num_workers=1, backend="dali"), 2)
        next(iter(source))  # a built, running pipeline
        cycle: list = [source]
        cycle.append(cycle)  # only the garbage collector can free it now


def test_workers_do_not_fork_the_parent():
    assert WORKER_START_METHOD in ("forkserver", "spawn")


def test_workers_are_safe_with_dali_pipelines_alive_in_the_parent(tmp_path):
    pytest.importorskip("nvidia.dali")
    root = make_image_folder(str(tmp_path / "images"))
    folder = list_image_folder(root)
    gc.disable()  # keep the parent's cycles (and their pipelines) alive until the workers run
    try:
        _dali_sources_in_cycles(root, 2)
        for attempt in range(3):
            sampler = EpochSampler(len(folder.paths), 2, seed=attempt)
            source = LoaderBatches(CollectingDataset(ImageFolderDataset(folder, 16)), sampler,
                                   num_workers=2, in_channels=3, resolution=16, num_classes=2,
                                   device=torch.device("cpu"))
            for epoch in range(2):
                source.set_epoch(epoch)
                batches = list(source)
                assert len(batches) == 6 and batches[0][0].shape == (2, 3, 16, 16)
            source.close()
    finally:
        gc.enable()
        gc.collect()
