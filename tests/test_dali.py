"""DALI pipelines (CPU, device_id=None) against the torch backend on the same files.

Skipped only where nvidia-dali is not installed; `make setup` installs it, so CI runs these.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_data import make_image_folder, sample_ids, truncate
from test_latents import PoolEncoder

from train.data import CorruptImageError, DataConfig, build_batches
from train.data.latents import prepare_latents

pytest.importorskip("nvidia.dali")

# Pixel levels (of 255) between DALI's one antialiased cubic resize and ADM's PIL
# BOX + BICUBIC, measured on these images (decode is lossless PNG on both sides):
# 32 px (no BOX step): max 1, mean 0.07 (worst image 0.08);
# 16 px (one BOX halving first): max 6, mean 0.39 (worst image 0.42).
RESIZE_BOUNDS = {32: (1.01, 0.15), 16: (7.0, 0.6)}  # (max, mean per batch)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_image_folder(str(tmp_path_factory.mktemp("images")))


def epochs(cfg: DataConfig, backend: str, epoch_list, **kwargs) -> list:
    cfg = DataConfig(**{**cfg.__dict__, "backend": backend})
    source = build_batches(cfg, **kwargs)
    assert source.backend == backend
    source.set_epoch(7)
    next(iter(source))  # an abandoned epoch must not leak into the next
    out = []
    for epoch in epoch_list:
        source.set_epoch(epoch)
        out.append(list(source))
    return out


@pytest.mark.parametrize("resolution", [32, 16])
def test_dali_image_batches_match_torch(folder, resolution):
    cfg = DataConfig(source="image-folder", path=folder, resolution=resolution, num_workers=0)
    kwargs = dict(batch_size=2, rank=1, world_size=2, seed=3)
    # Epoch 3 first, as after a resume; then 4 through the same pipeline.
    dali = epochs(cfg, "dali", [3, 4], **kwargs)
    torch_ = epochs(cfg, "torch", [3, 4], **kwargs)
    max_bound, mean_bound = RESIZE_BOUNDS[resolution]
    flipped_seen = 0
    for dali_epoch, torch_epoch in zip(dali, torch_, strict=True):
        assert len(dali_epoch) == 3
        for (xd, yd), (xt, yt) in zip(dali_epoch, torch_epoch, strict=True):
            assert xd.shape == xt.shape == (2, 3, resolution, resolution)
            assert xd.dtype == torch.float32 and yd.dtype == torch.int64 and yd.shape == (2,)
            assert torch.equal(yd, yt) and sample_ids(xd) == sample_ids(xt)
            levels = (xd - xt).abs() * 127.5
            assert levels.max() <= max_bound and levels.mean() <= mean_bound
            # Green rises left to right unless flipped: both flip the same, along width.
            rises = xd[:, 1, :, -1].mean(-1) > xd[:, 1, :, 0].mean(-1)
            assert torch.equal(rises, xt[:, 1, :, -1].mean(-1) > xt[:, 1, :, 0].mean(-1))
            flipped_seen += int((~rises).sum())
    assert 0 < flipped_seen < 12
    assert [sample_ids(x) for x, _ in dali[0]] != [sample_ids(x) for x, _ in dali[1]]


def test_dali_exact_once_over_two_ranks(folder):
    cfg = DataConfig(source="image-folder", path=folder, resolution=16, num_workers=1,
                     backend="dali")
    seen = {0: [], 1: []}
    for rank in (0, 1):
        source = build_batches(cfg, 2, rank=rank, world_size=2, seed=11)
        for epoch in (0, 1):
            source.set_epoch(epoch)
            seen[epoch].append([i for x, _ in source for i in sample_ids(x)])
    for epoch in (0, 1):
        assert sorted(seen[epoch][0] + seen[epoch][1]) == list(range(12))
    assert seen[0] != seen[1]


def test_dali_latent_batches_equal_torch(tmp_path, folder):
    out = str(tmp_path / "latents")
    prepare_latents(folder, out, encode=PoolEncoder(), scale=0.5, resolution=16, batch_size=6,
                    shard_size=7, num_workers=0, progress=False)
    cfg = DataConfig(source="latents", path=out, num_workers=0)
    kwargs = dict(batch_size=2, rank=0, world_size=2, seed=5)
    dali = epochs(cfg, "dali", [0, 1], **kwargs)
    torch_ = epochs(cfg, "torch", [0, 1], **kwargs)
    for dali_epoch, torch_epoch in zip(dali, torch_, strict=True):
        assert len(dali_epoch) == 3
        for (xd, yd), (xt, yt) in zip(dali_epoch, torch_epoch, strict=True):
            assert xd.shape == (2, 4, 4, 4) and xd.dtype == torch.float32
            assert torch.equal(yd, yt) and torch.equal(xd, xt)
    assert not torch.equal(dali[0][0][0], dali[1][0][0])
    # A mid-epoch resume through the same pipeline gives the rest of the epoch.
    source = build_batches(DataConfig(**{**cfg.__dict__, "backend": "dali"}), **kwargs)
    source.set_epoch(1, start_step=1)
    resumed = list(source)
    assert len(resumed) == 2 and all(torch.equal(a[0], b[0])
                                     for a, b in zip(resumed, torch_[1][1:], strict=True))


def test_dali_corrupt_file_named_or_skipped(tmp_path):
    root = make_image_folder(str(tmp_path / "images"))
    bad = os.path.join(root, "class_0", "img_4.png")
    truncate(bad)
    cfg = DataConfig(source="image-folder", path=root, resolution=16, backend="dali",
                     num_workers=0)
    source = build_batches(cfg, 4)
    with pytest.raises(CorruptImageError, match="img_4.png") as info:
        list(source)
    assert info.value.path == bad
    other = make_image_folder(str(tmp_path / "other"), per_class=2)
    garbage = os.path.join(other, "class_1", "img_0.png")  # not even a readable header
    with open(garbage, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(CorruptImageError, match="img_0.png"):
        list(build_batches(DataConfig(**{**cfg.__dict__, "path": other}), 4))
    cfg.on_corrupt = "skip"
    with pytest.warns(UserWarning, match="skipping 1 unreadable"):
        source = build_batches(cfg, 11)
    (x, _), = list(source)
    assert source.skipped == [bad] and sorted(sample_ids(x)) == [i for i in range(12) if i != 4]


def test_dali_backend_errors():
    with pytest.raises(ValueError, match="does not support data.source='animal-mnist'"):
        build_batches(DataConfig(backend="dali"), 4)
    assert build_batches(DataConfig(backend="auto"), 4).backend == "torch"
