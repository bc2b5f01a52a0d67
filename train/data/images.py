"""Image files: folders of class sub-folders, decoding, ADM's centre crop, corrupt files, and
the one float-to-uint8 quantisation that saved samples and FID share.

This is the data layer's image I/O; `metrics` reads image folders and quantises samples
through it, so both sides agree on what an image file and a saved sample are.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def samples_to_uint8(samples: torch.Tensor) -> torch.Tensor:
    """float samples in [-1, 1] -> uint8, as EDM saves images: floor(127.5 x + 128), clipped."""
    if not torch.is_floating_point(samples):
        raise TypeError(f"samples must be a float tensor in [-1, 1], got {samples.dtype}")
    return (samples.to(torch.float32) * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)


class CorruptImageError(OSError):
    """An image that cannot be read or decoded; `path` names it."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = path


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
