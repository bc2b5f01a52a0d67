"""Reference statistics: computed once per (data set, network), cached as .npz with provenance.

A reference is named by a spec:
- ``animal-mnist[:split[:count]]`` — the embedded data set (split ``train`` (default, 9,000)
  or ``test`` (1,000)); ``count`` takes the first images of a fixed seeded permutation, so a
  subset is class-balanced in expectation and identical on every machine.
- a folder of images (png/jpg/jpeg/bmp/webp, searched recursively, sorted by path);
- an ``.npz``: either one this module wrote (keys ``mu``, ``sigma``, ``features``,
  ``provenance``) or an ADM reference batch such as ``VIRTUAL_imagenet256_labeled.npz``
  (keys ``mu``, ``sigma`` = precomputed pool_3 statistics, ``mu_s``/``sigma_s`` spatial ones,
  ``arr_0`` = the reference images, uint8 NHWC). A 2-D float ``arr_0`` is read as
  activations [N, 2048] instead.

Cache: ``<cache>/fid-refs/<name>-<network sha256[:12]>.npz``; ``<cache>`` is the
``cache_dir`` argument, else ``$SDDIT_CACHE``, else ``~/.cache/sddit``. Keying on the
network hash means a different Inception file never reuses stale statistics.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metrics.inception import InceptionNetwork, as_nchw_uint8, file_sha256
from metrics.statistics import RunningStatistics
from train.data.images import IMAGE_EXTENSIONS, samples_to_uint8

ANIMAL_MNIST = "animal-mnist"


@dataclass
class Reference:
    mu: np.ndarray  # [2048] float64
    sigma: np.ndarray  # [2048, 2048] float64
    features: np.ndarray | None  # [N, 2048] float32, for precision/recall
    provenance: dict = field(default_factory=dict)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("SDDIT_CACHE") or Path.home() / ".cache" / "sddit")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- image sources


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    return files


def iter_folder_batches(files: list[Path], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 [B, 3, H, W] batches; grayscale files become 3 equal channels."""
    for start in range(0, len(files), batch_size):
        arrays = [
            np.asarray(Image.open(p).convert("RGB"), dtype=np.uint8)
            for p in files[start : start + batch_size]
        ]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"images under one folder must share a size, found {sorted(shapes)}")
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


def read_npz_images(path: str | os.PathLike) -> np.ndarray:
    """Images from an .npz: key arr_0 (ADM sample batches), images or samples, or the only key.
    uint8 arrays are taken as is; float arrays as samples in [-1, 1] (quantised like EDM)."""
    with np.load(path, allow_pickle=False) as data:
        keys = [k for k in ("arr_0", "images", "samples") if k in data.files]
        if not keys and len(data.files) == 1:
            keys = data.files
        if not keys:
            raise ValueError(
                f"{path}: expected an image array under arr_0, images or samples; "
                f"found keys {data.files}"
            )
        array = data[keys[0]]
    if np.issubdtype(array.dtype, np.floating):
        array = _float_images_to_uint8(array, str(path))
    as_nchw_uint8(array)  # validates rank, dtype and channels
    return array


def _float_images_to_uint8(array: np.ndarray, where: str) -> np.ndarray:
    """Float images by their range: [-1, 1] samples are quantised like EDM; [0, 1] and
    [0, 255] images are converted with a warning; anything else is refused (a silent clamp
    would score garbage)."""
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: the float images contain nan or inf")
    lo, hi = float(array.min()), float(array.max())
    tol = 1e-3
    if lo >= -1 - tol and hi <= 1 + tol and lo < -tol:
        return samples_to_uint8(torch.from_numpy(array)).numpy()
    if lo >= -tol and hi <= 1 + tol:
        warnings.warn(f"{where}: float images in [{lo:.3g}, {hi:.3g}] read as [0, 1] images "
                      "and scaled to uint8 (samples in [-1, 1] would have negative values)",
                      stacklevel=3)
        return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)
    if lo >= -tol and hi <= 255 + tol:
        warnings.warn(f"{where}: float images in [{lo:.3g}, {hi:.3g}] read as [0, 255] pixel "
                      "values and rounded to uint8", stacklevel=3)
        return np.clip(np.rint(array), 0, 255).astype(np.uint8)
    raise ValueError(f"{where}: float images span [{lo:.3g}, {hi:.3g}]; expected samples in "
                     "[-1, 1], images in [0, 1] or pixel values in [0, 255] (or uint8)")


def iter_array_batches(
    images: np.ndarray | torch.Tensor, batch_size: int
) -> Iterator[torch.Tensor]:
    nchw = as_nchw_uint8(images)
    for start in range(0, len(nchw), batch_size):
        yield nchw[start : start + batch_size]


def features_of_batches(
    network: InceptionNetwork,
    batches: Iterator[torch.Tensor],
    total: int,
    progress: bool,
    desc: str,
) -> tuple[RunningStatistics, np.ndarray, np.ndarray | None]:
    """Stream uint8 batches through the network: (moments, features [N, 2048], logits)."""
    from tqdm.auto import tqdm

    stats = RunningStatistics()
    features, logits = [], []
    with tqdm(total=total, desc=desc, disable=not progress, unit="img") as bar:
        for batch in batches:
            feats, batch_logits = network.features(batch)
            stats.update(feats)
            features.append(feats.cpu().numpy())
            if batch_logits is not None:
                logits.append(batch_logits.cpu().numpy())
            bar.update(len(batch))
    return stats, np.concatenate(features), (np.concatenate(logits) if logits else None)


# ----------------------------------------------------------------------------- npz files


def save_reference(path: str | os.PathLike, reference: Reference) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays = {
        "mu": reference.mu,
        "sigma": reference.sigma,
        "provenance": np.array(json.dumps(reference.provenance)),
    }
    if reference.features is not None:
        arrays["features"] = reference.features.astype(np.float32)
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file


def _npz_header(path: str | os.PathLike, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one member of an .npz without reading its data."""
    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read_header = (
            np.lib.format.read_array_header_1_0
            if major == 1
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read_header(f)
    return shape, dtype


def _has_image_array(path: str | os.PathLike) -> bool:
    with zipfile.ZipFile(path) as archive:
        if "arr_0.npy" not in archive.namelist():
            return False
    shape, dtype = _npz_header(path, "arr_0")
    return len(shape) in (3, 4) and dtype == np.uint8


def read_reference_npz(
    path: str | os.PathLike,
    load_images: bool = True,
) -> tuple[Reference, np.ndarray | None]:
    """(reference, images or None). Images come back when the file holds uint8 images (ADM's
    arr_0) rather than activations, and `load_images`; mu/sigma may then be None."""
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        mu = data["mu"].astype(np.float64) if "mu" in keys else None
        sigma = data["sigma"].astype(np.float64) if "sigma" in keys else None
        provenance = json.loads(str(data["provenance"])) if "provenance" in keys else {}
        features, images = (data["features"] if "features" in keys else None), None
        if "arr_0" in keys:
            shape, dtype = _npz_header(path, "arr_0")
            if len(shape) == 2 and np.issubdtype(dtype, np.floating):
                features = data["arr_0"].astype(np.float32)
            elif load_images or mu is None:
                images = data["arr_0"]
    if not provenance:
        provenance = {
            "format": "adm-reference-batch",
            "file": os.path.abspath(path),
            "mu_sigma": "precomputed in the file" if mu is not None else "computed here",
        }
    if mu is None and features is not None:
        stats = RunningStatistics(features.shape[1])
        stats.update(features)
        mu, sigma = stats.mean(), stats.covariance()
    if mu is None and images is None:
        raise ValueError(f"{path}: expected mu/sigma, features or arr_0; found {sorted(keys)}")
    return Reference(mu, sigma, features, provenance), images


# ----------------------------------------------------------------------------- specs


def parse_animal_mnist(spec: str) -> tuple[str, int | None]:
    parts = spec.split(":")
    if parts[0] != ANIMAL_MNIST or len(parts) > 3:
        raise ValueError(f"expected animal-mnist[:split[:count]], got {spec!r}")
    split = parts[1] if len(parts) > 1 and parts[1] else "train"
    if split not in ("train", "test"):
        raise ValueError(f"animal-mnist split must be train or test, got {split!r}")
    count = int(parts[2]) if len(parts) > 2 else None
    if count is not None and count < 2:
        raise ValueError(f"animal-mnist count must be >= 2, got {count}")
    return split, count


def animal_mnist_images(split: str, count: int | None) -> np.ndarray:
    """uint8 [N, 32, 32]: the split, or its first `count` under a fixed permutation."""
    from train.data.animal_mnist import load_animal_mnist

    images, _ = load_animal_mnist(split)
    if count is not None:
        if count > len(images):
            raise ValueError(f"animal-mnist {split} has {len(images)} images, asked for {count}")
        images = images[np.random.default_rng(1234).permutation(len(images))[:count]]
    return images


def _cached(path: Path, compute, progress: bool) -> Reference:
    if path.is_file():
        reference, _ = read_reference_npz(path, load_images=False)
        reference.provenance["cache_file"] = str(path)
        return reference
    reference = compute()
    save_reference(path, reference)
    reference.provenance["cache_file"] = str(path)
    if progress:
        print(f"reference statistics cached at {path}")
    return reference


def _from_images(
    network: InceptionNetwork, batches, total: int, provenance: dict, progress: bool
) -> Reference:
    stats, features, _ = features_of_batches(
        network, batches, total, progress, "reference features"
    )
    provenance = {
        "format": "sddit-reference",
        **provenance,
        "count": stats.num,
        "network_file": network.path,
        "network_sha256": network.sha256,
        "date": _now(),
    }
    return Reference(stats.mean(), stats.covariance(), features, provenance)


def load_reference(
    spec: str,
    network: InceptionNetwork,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 64,
    progress: bool = True,
    need_features: bool = True,
) -> Reference:
    """Reference statistics for `spec` (see the module docstring), cached per network."""
    refs = cache_root(cache_dir) / "fid-refs"
    if spec.split(":")[0] == ANIMAL_MNIST:
        return _animal_mnist_reference(spec, network, refs, batch_size, progress)
    path = Path(spec)
    if path.is_dir():
        return _folder_reference(path, network, refs, batch_size, progress)
    if path.suffix == ".npz" and path.is_file():
        return _npz_reference(path, network, refs, batch_size, progress, need_features)
    raise FileNotFoundError(
        f"reference {spec!r} is neither 'animal-mnist[:split[:count]]', an image folder, "
        "nor an existing .npz file"
    )


def _animal_mnist_reference(spec: str, network: InceptionNetwork, refs: Path,
                            batch_size: int, progress: bool) -> Reference:
    split, count = parse_animal_mnist(spec)
    images = animal_mnist_images(split, count)
    name = f"animal-mnist-{split}-{count or 'all'}-{network.sha256[:12]}.npz"
    provenance = {"dataset": ANIMAL_MNIST, "split": split,
                  "subset_seed": 1234 if count else None, "spec": spec}
    return _cached(refs / name, lambda: _from_images(
        network, iter_array_batches(images, batch_size), len(images), provenance, progress),
        progress)


def _folder_reference(path: Path, network: InceptionNetwork, refs: Path, batch_size: int,
                      progress: bool) -> Reference:
    """Cached under the folder's listing (names, sizes, mtimes): an edit recomputes."""
    files = list_image_files(path)
    listing = hashlib.sha256(
        "\n".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files).encode()
    ).hexdigest()
    name = f"folder-{path.resolve().name}-{listing[:12]}-{network.sha256[:12]}.npz"
    provenance = {"dataset": "image-folder", "folder": str(path.resolve()),
                  "listing_sha256": listing}
    return _cached(refs / name, lambda: _from_images(
        network, iter_folder_batches(files, batch_size), len(files), provenance, progress),
        progress)


def _npz_reference(path: Path, network: InceptionNetwork, refs: Path, batch_size: int,
                   progress: bool, need_features: bool) -> Reference:
    """An ADM-style batch: its own mu/sigma where present (what published numbers use);
    features from its images with our network, cached once, only where P/R needs them."""
    # Images are read only when mu/sigma are missing or features must be computed.
    reference, images = read_reference_npz(path, load_images=False)
    if reference.features is not None or (not need_features and reference.mu is not None):
        return reference
    if images is None and not _has_image_array(path):
        return reference  # statistics only: FID works, precision/recall is skipped
    digest = file_sha256(str(path))
    name = f"npz-{path.stem}-{digest[:12]}-{network.sha256[:12]}.npz"
    provenance = {**reference.provenance, "images_sha256": digest}

    def compute() -> Reference:
        array = images if images is not None else read_reference_npz(path)[1]
        batches = iter_array_batches(array, batch_size)
        return _from_images(network, batches, len(array), provenance, progress)

    computed = _cached(refs / name, compute, progress)
    if reference.mu is None:
        return computed
    reference.features = computed.features
    reference.provenance["features_cache_file"] = computed.provenance.get("cache_file")
    return reference
