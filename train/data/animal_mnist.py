"""The embedded data set: animal-mnist, 10,000 real 28x28 animal silhouettes, 10 classes.

Installed from PyPI with `pip install --no-deps animal-mnist` (it declares tensorflow,
which only its own MNIST helpers need); we read its two data files directly. Images are
zero-padded to 32x32 so that patch 2 gives 256 tokens, the sequence length of
ImageNet-256 latents. A fixed, class-balanced 10% is held out for evaluation.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from functools import lru_cache
from typing import Literal

import numpy as np

NUM_CLASSES = 10
RESOLUTION = 32
HELD_OUT_PER_CLASS = 100
Split = Literal["train", "test", "all"]


def package_dir() -> str:
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "animal-mnist is not installed: run `pip install --no-deps animal-mnist==0.4` "
            "(or `make setup`)"
        )
    return os.path.join(os.path.dirname(spec.origin), "data", "Animal_MNIST")


def _read_pickled_array(path: str) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            array = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError) as exc:
        raise OSError(f"cannot read animal-mnist file {path}: {exc}") from exc
    if not isinstance(array, np.ndarray):
        raise OSError(f"{path}: expected a numpy array, found {type(array).__name__}")
    return array


@lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
    root = package_dir()
    images = _read_pickled_array(os.path.join(root, "animal_data_version_3.gz"))
    labels = _read_pickled_array(os.path.join(root, "animal_label_version_3.gz"))
    if images.shape[1:] != (28, 28) or images.dtype != np.uint8 or len(images) != len(labels):
        raise OSError(f"{root}: unexpected animal-mnist contents {images.shape} {images.dtype}")
    padded = np.zeros((len(images), RESOLUTION, RESOLUTION), dtype=np.uint8)
    padded[:, 2:30, 2:30] = images
    return padded, labels.astype(np.int64)


def held_out_mask(labels: np.ndarray) -> np.ndarray:
    """A fixed class-balanced hold-out: the first HELD_OUT_PER_CLASS of each class under a
    seeded permutation, so the split never changes between runs or machines."""
    order = np.random.default_rng(0).permutation(len(labels))
    mask = np.zeros(len(labels), dtype=bool)
    for c in range(NUM_CLASSES):
        mask[order[labels[order] == c][:HELD_OUT_PER_CLASS]] = True
    return mask


def load_animal_mnist(split: Split = "train") -> tuple[np.ndarray, np.ndarray]:
    """Returns (images uint8 [N, 32, 32], labels int64 [N]); train 9,000, test 1,000."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    images, labels = _load_all()
    if split == "all":
        return images, labels
    mask = held_out_mask(labels)
    keep = mask if split == "test" else ~mask
    return images[keep], labels[keep]


def to_model_range(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W] -> float32 [N, 1, H, W] in [-1, 1]."""
    return (images_uint8.astype(np.float32) / 127.5 - 1.0)[:, None]
