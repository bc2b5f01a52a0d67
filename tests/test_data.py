"""Data: the epoch sampler, animal-mnist, image folders and the torch backend.

Generated images carry their identity: red is 10 + 20*id everywhere (it survives resizing),
green rises left to right (shows the flip axis), blue is a smooth random texture (makes a
wrong flip or a misplaced crop visible). The DALI backend is tested in test_dali.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import (
    CorruptImageError,
    DataConfig,
    EpochSampler,
    adm_center_crop,
    adm_crop_plan,
    build_batches,
    list_image_folder,
)

WIDTH, HEIGHT = 40, 36


def make_image(sample_id: int, rng: np.random.Generator) -> Image.Image:
    red = np.full((HEIGHT, WIDTH), 10 + 20 * sample_id, np.uint8)
    green = np.tile(np.linspace(0, 255, WIDTH), (HEIGHT, 1)).round().astype(np.uint8)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 5), dtype=np.uint8))
    blue = np.asarray(coarse.resize((WIDTH, HEIGHT), Image.BILINEAR))
    return Image.fromarray(np.stack([red, green, blue], axis=-1))


def make_image_folder(root: str, classes: int = 2, per_class: int = 6, seed: int = 0) -> str:
    """root/class_<c>/img_<i>.png with ids 0..classes*per_class-1 in label order."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class_{c}"))
        for i in range(per_class):
            path = os.path.join(root, f"class_{c}", f"img_{i}.png")
            make_image(c * per_class + i, rng).save(path)
    return root


def truncate(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def sample_ids(x: torch.Tensor) -> list[int]:
    """The id in the red channel of each image of a batch in [-1, 1]."""
    red = (x[:, 0].mean(dim=(1, 2)) + 1) * 127.5  # [B]
    return ((red - 10) / 20).round().long().tolist()


def epoch_ids(cfg: DataConfig, epoch: int, world_size: int = 2, batch_size: int = 2,
              seed: int = 0) -> list[list[int]]:
    per_rank = []
    for rank in range(world_size):
        source = build_batches(cfg, batch_size, rank=rank, world_size=world_size, seed=seed)
        source.set_epoch(epoch)
        per_rank.append([i for x, _ in source for i in sample_ids(x)])
    return per_rank


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_image_folder(str(tmp_path_factory.mktemp("images")))


def test_sampler_exact_once_over_ranks_and_real_shuffle():
    n, batch, world = 103, 4, 2
    samplers = [EpochSampler(n, batch, rank=r, world_size=world, seed=7) for r in range(world)]
    assert samplers[0].steps_per_epoch == 12 and samplers[0].dropped_per_epoch == 7
    orders = []
    for epoch in range(3):
        seen = np.concatenate([s.epoch(epoch)[0].ravel() for s in samplers])
        dropped = samplers[0].dropped(epoch)
        assert len(dropped) == 7
        np.testing.assert_array_equal(np.sort(np.concatenate([seen, dropped])), np.arange(n))
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    assert set(samplers[0].dropped(0)) != set(samplers[0].dropped(1))  # the tail moves
    # Identical on every rank given the seed; a different seed shuffles differently.
    again = EpochSampler(n, batch, rank=1, world_size=world, seed=7)
    np.testing.assert_array_equal(again.epoch(1)[0], samplers[1].epoch(1)[0])
    other = EpochSampler(n, batch, rank=1, world_size=world, seed=8)
    assert not np.array_equal(other.epoch(1)[0], samplers[1].epoch(1)[0])
    # Consecutive batches are not runs of consecutive ids (a lost shuffle).
    assert not np.array_equal(np.sort(orders[0][:8]), orders[0][:8])


def test_sampler_flips_are_random_and_can_be_switched_off():
    indices, flips = EpochSampler(1000, 10, seed=1).epoch(0)
    assert 400 < flips.sum() < 600
    _, no_flips = EpochSampler(1000, 10, seed=1, hflip=False).epoch(0)
    assert not no_flips.any()
    with pytest.raises(ValueError, match="global batch"):
        EpochSampler(5, 4, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(50, 4, rank=2, world_size=2)


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="data.source"):
        build_batches(DataConfig(source="imagenet"), 4)
    with pytest.raises(ValueError, match="data.backend"):
        build_batches(DataConfig(backend="tpu"), 4)
    with pytest.raises(ValueError, match="data.on_corrupt"):
        build_batches(DataConfig(on_corrupt="ignore"), 4)
    with pytest.raises(ValueError, match="data.path is required"):
        build_batches(DataConfig(source="image-folder"), 4)
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_batches(DataConfig(source="image-folder", path=missing), 4)
    with pytest.raises(FileNotFoundError, match="index.json"):
        build_batches(DataConfig(source="latents", path=str(tmp_path)), 4)
    with pytest.raises(ValueError, match="no class sub-folders"):
        build_batches(DataConfig(source="image-folder", path=str(tmp_path)), 4)
    with pytest.raises(ValueError, match="split"):
        build_batches(DataConfig(), 4, split="val")


def test_animal_mnist_shapes_range_labels_and_split():
    train = build_batches(DataConfig(), 50, seed=0)
    test = build_batches(DataConfig(), 50, split="test", world_size=2, rank=1)
    assert (train.num_samples, test.num_samples) == (9000, 1000)
    assert (train.in_channels, train.resolution, train.num_classes) == (1, 32, 10)
    assert train.backend == "torch" and len(train) == 180 and len(test) == 10
    x, y = next(iter(train))
    assert x.shape == (50, 1, 32, 32) and x.dtype == torch.float32
    assert y.shape == (50,) and y.dtype == torch.int64 and y.min() >= 0 and y.max() <= 9
    assert x.min() == -1.0 and x.max() <= 1.0 and x.max() > 0.9
    # The 28x28 silhouettes are zero-padded by 2 on each side (black = -1).
    assert (x[..., :2, :] == -1).all() and (x[..., :, -2:] == -1).all()
    train_labels = torch.cat([b for _, b in train])
    assert torch.bincount(train_labels, minlength=10).min() > 700  # all classes, balanced-ish
    x_test, _ = next(iter(test))
    assert x_test.shape == (50, 1, 32, 32)


def test_animal_mnist_flips_mirror_width():
    plain = build_batches(DataConfig(hflip=False), 100, seed=3)
    flipped = build_batches(DataConfig(hflip=True), 100, seed=3)
    (xa, ya), (xb, yb) = next(iter(plain)), next(iter(flipped))
    assert torch.equal(ya, yb)  # the flag changes pixels, not the order
    mirrored = (xb == xa.flip(-1)).flatten(1).all(1)
    same = (xb == xa).flatten(1).all(1)
    assert (mirrored | same).all() and 25 < (mirrored & ~same).sum() < 75


def test_adm_crop_plan_matches_adm():
    plan = adm_crop_plan(WIDTH, HEIGHT, 16)  # 36 >= 32: one BOX halving first
    assert plan.halvings == ((20, 18),) and plan.resized == (18, 16) and plan.anchor == (0, 1)
    plan = adm_crop_plan(500, 375, 256)
    assert plan.halvings == () and plan.resized == (341, 256) and plan.anchor == (0, 42)
    crop = adm_center_crop(Image.new("RGB", (WIDTH, HEIGHT), (200, 100, 50)), 32)
    assert crop.shape == (32, 32, 3) and (crop == [200, 100, 50]).all()


def test_image_folder_torch_batches(folder):
    listing = list_image_folder(folder)
    assert listing.class_names == ["class_0", "class_1"]
    assert listing.labels.tolist() == [0] * 6 + [1] * 6
    source = build_batches(DataConfig(source="image-folder", path=folder, resolution=32,
                                      backend="torch", num_workers=0), 4, seed=5)
    assert (source.backend, source.num_samples, len(source)) == ("torch", 12, 3)
    assert source.in_channels == 3
    assert source.num_classes == 2 and source.dropped_per_epoch == 0
    indices, flips = source.sampler.epoch(0)
    batches = list(source)
    for (x, y), step_indices, step_flips in zip(batches, indices, flips, strict=True):
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.min() >= -1 and x.max() <= 1
        assert sample_ids(x) == step_indices.tolist()
        assert y.tolist() == [i // 6 for i in step_indices]
        for image, index, flip in zip(x, step_indices, step_flips, strict=True):
            path = listing.paths[index]
            expected = adm_center_crop(Image.open(path).convert("RGB"), 32)  # [H, W, 3]
            expected = torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 127.5 - 1
            torch.testing.assert_close(image, expected.flip(-1) if flip else expected)
            green_rises = image[1, :, -1].mean() > image[1, :, 0].mean()
            assert green_rises != bool(flip)  # flipped along the width axis


def test_image_folder_exact_once_over_two_ranks_with_workers(folder):
    cfg = DataConfig(source="image-folder", path=folder, resolution=16, num_workers=2,
                     backend="torch")
    epochs = []
    for epoch in (0, 1):
        per_rank = epoch_ids(cfg, epoch, world_size=2, batch_size=2)
        assert all(len(ids) == 6 for ids in per_rank)
        assert sorted(per_rank[0] + per_rank[1]) == list(range(12))
        epochs.append(per_rank)
    assert epochs[0] != epochs[1]


def test_corrupt_image_error_names_the_path_or_is_skipped(tmp_path):
    root = make_image_folder(str(tmp_path / "images"))
    bad = os.path.join(root, "class_1", "img_2.png")
    truncate(bad)
    cfg = DataConfig(source="image-folder", path=root, backend="torch", num_workers=0)
    with pytest.raises(CorruptImageError, match="img_2.png") as info:
        source = build_batches(cfg, 11)
        list(source)
    assert info.value.path == bad
    cfg.on_corrupt = "skip"
    with pytest.warns(UserWarning, match="skipping 1 unreadable"):
        source = build_batches(cfg, 11)
    assert source.skipped == [bad] and source.num_samples == 11
    (x, _), = list(source)
    assert sorted(sample_ids(x)) == [i for i in range(12) if i != 8]
