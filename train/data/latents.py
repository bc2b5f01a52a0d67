"""`sddit prepare-latents`: encode an image folder with a VAE into sharded latent moments.

Layout of the output folder (read back by `LatentShards`):
- `shard_00000_moments.npy`       [n, 2C, h, w]  mean and logvar of each image, concatenated
- `shard_00000_moments_flip.npy`  [n, 2C, h, w]  the same for the horizontally flipped image
- `shard_00000_labels.npy`        [n] int64
- `index.json`: format, count, moment/latent shapes, dtype, scale, class names, the shard
  list, and provenance (source folder, encoder, resolution, skipped files, versions).
The index is written last and atomically, so a folder with an index is complete.

The VAE is diffusers' `AutoencoderKL`, loaded only from a local path; nothing is downloaded.
Any callable `encode(x [B, 3, H, W] in [-1, 1]) -> (mean, logvar)` can stand in for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from train.data.images import CorruptImageError, ImageFolderDataset, usable_images
from train.data.sources import worker_options

Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SD_VAE_SCALE = 0.18215
LATENT_INDEX = "index.json"
LATENT_FORMAT = "sddit-latent-shards"


class LatentShards:
    """Reads an index written by `train.data.latents.prepare_latents`; shards are memory-mapped."""

    def __init__(self, root: str):
        index_path = os.path.join(root, LATENT_INDEX)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"latent index {index_path!r} not found "
                                    "(write one with `sddit prepare-latents`)")
        with open(index_path) as f:
            index = json.load(f)
        if index.get("format") != LATENT_FORMAT:
            raise ValueError(f"{index_path}: not a {LATENT_FORMAT} index")
        self.root, self.index = root, index
        self.scale = float(index["scale"])
        self.class_names = list(index["class_names"])
        self.moment_shape = tuple(index["moment_shape"])  # (2C, h, w)
        self.moments, self.moments_flip, labels = [], [], []
        for shard in index["shards"]:
            moments, flipped, shard_labels = self._load_shard(shard, index_path)
            self.moments.append(moments)
            self.moments_flip.append(flipped)
            labels.append(np.asarray(shard_labels, dtype=np.int64))
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        if len(self.labels) != index["count"]:
            raise ValueError(f"{index_path}: shards hold {len(self.labels)} samples, "
                             f"index says {index['count']}")
        self.starts = np.cumsum([0] + [len(m) for m in self.moments])

    def _load_shard(self, shard: dict, index_path: str
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One shard's arrays, checked against the index; errors name the shard's file."""
        moments = self._load(shard["moments"])
        flipped = self._load(shard["moments_flip"])
        shard_labels = self._load(shard["labels"])
        where = os.path.join(self.root, shard["moments"])
        if (moments.shape != flipped.shape or moments.shape[1:] != self.moment_shape
                or len(shard_labels) != len(moments) or len(moments) != shard["count"]):
            raise ValueError(f"{index_path}: shard {where} does not match the index "
                             f"(moments {moments.shape}, flipped {flipped.shape}, "
                             f"{len(shard_labels)} labels, index count {shard['count']})")
        for name, array in ((shard["moments"], moments), (shard["moments_flip"], flipped)):
            if not np.issubdtype(array.dtype, np.floating):
                raise ValueError(f"latent shard {os.path.join(self.root, name)}: moments must "
                                 f"be float16 or float32, got {array.dtype}")
        label_path = os.path.join(self.root, shard["labels"])
        if not np.issubdtype(shard_labels.dtype, np.integer):
            raise ValueError(f"latent shard {label_path}: labels must be integers, got "
                             f"{shard_labels.dtype}")
        if len(shard_labels) and (shard_labels.min() < 0
                                  or shard_labels.max() >= len(self.class_names)):
            raise ValueError(f"latent shard {label_path}: labels must be in [0, "
                             f"{len(self.class_names)}) for the index's classes, found "
                             f"[{shard_labels.min()}, {shard_labels.max()}]")
        return moments, flipped, shard_labels

    def _load(self, name: str) -> np.ndarray:
        path = os.path.join(self.root, name)
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise OSError(f"cannot read latent shard {path}: {exc}") from exc

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, index: int, flip: bool) -> np.ndarray:
        """Moments (mean, logvar) of one sample: float [2C, h, w]."""
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        source = self.moments_flip if flip else self.moments
        return np.array(source[shard][index - self.starts[shard]])  # a copy out of the mmap


class LatentDataset(torch.utils.data.Dataset):
    def __init__(self, shards: LatentShards):
        self.shards = shards

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, item: tuple[int, bool]) -> tuple[torch.Tensor, int]:
        index, flip = item
        return torch.from_numpy(self.shards.get(index, flip)), int(self.shards.labels[index])


def load_vae_encoder(vae_path: str, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[Encoder, float]:
    """diffusers AutoencoderKL from a local folder -> (encode, scaling factor)."""
    if not vae_path or not os.path.isdir(vae_path):
        raise FileNotFoundError(
            f"vae_path {vae_path!r} is not a local folder: give the folder of a diffusers "
            "AutoencoderKL (config.json and weights), e.g. a saved copy of the SD VAE; "
            "nothing is downloaded")
    try:
        from diffusers import AutoencoderKL
    except ImportError as exc:
        raise ImportError("prepare-latents needs diffusers to load the VAE at vae_path: "
                          "pip install diffusers") from exc
    vae = AutoencoderKL.from_pretrained(vae_path, local_files_only=True, torch_dtype=dtype)
    vae = vae.to(device).eval().requires_grad_(False)
    scale = float(getattr(vae.config, "scaling_factor", SD_VAE_SCALE))

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = vae.encode(x.to(dtype)).latent_dist
        return posterior.mean, posterior.logvar

    return encode, scale


class _ShardWriter:
    def __init__(self, out_dir: str, shard_size: int, dtype: np.dtype):
        self.out_dir, self.shard_size, self.dtype = out_dir, shard_size, dtype
        self.moments: list[np.ndarray] = []
        self.flipped: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []
        self.pending = 0
        self.shards: list[dict] = []

    def add(self, moments: np.ndarray, flipped: np.ndarray, labels: np.ndarray) -> None:
        self.moments.append(moments.astype(self.dtype))
        self.flipped.append(flipped.astype(self.dtype))
        self.labels.append(labels.astype(np.int64))
        self.pending += len(labels)
        while self.pending >= self.shard_size:
            self._write(self.shard_size)

    def close(self) -> None:
        if self.pending:
            self._write(self.pending)

    def _write(self, count: int) -> None:
        moments, flipped, labels = (np.concatenate(a) for a in
                                    (self.moments, self.flipped, self.labels))
        stem = f"shard_{len(self.shards):05d}"
        entry = {"moments": f"{stem}_moments.npy", "moments_flip": f"{stem}_moments_flip.npy",
                 "labels": f"{stem}_labels.npy", "count": count}
        for key, array in (("moments", moments), ("moments_flip", flipped), ("labels", labels)):
            np.save(os.path.join(self.out_dir, entry[key]), array[:count])
        self.shards.append(entry)
        self.moments, self.flipped, self.labels = [moments[count:]], [flipped[count:]], [
            labels[count:]]
        self.pending -= count


def _as_list(batch: list) -> list:
    return batch  # items are (pixels, label) or a CorruptImageError, sorted out by the caller


class _TolerantDataset(torch.utils.data.Dataset):
    """Returns the error instead of raising, so "skip" can count files that break mid-run."""

    def __init__(self, dataset: ImageFolderDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[(index, False)]
        except CorruptImageError as exc:
            return exc


def _check_prepare_args(encode, vae_path, dtype: str, on_corrupt: str, sizes: dict,
                        out_dir: str, overwrite: bool) -> None:
    if (encode is None) == (vae_path is None):
        raise ValueError("give exactly one of vae_path (a local AutoencoderKL folder) or encode")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    if on_corrupt not in ("error", "skip"):
        raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if os.path.exists(os.path.join(out_dir, LATENT_INDEX)) and not overwrite:
        raise FileExistsError(f"out_dir {out_dir!r} already holds a {LATENT_INDEX}; "
                              "pass overwrite=True (--overwrite) to replace it")


def _resolve_encoder(encode: Encoder | None, vae_path: str | None, scale: float | None,
                     device: torch.device) -> tuple[Encoder, float, str]:
    """(encode, scale, a name for the provenance record)."""
    if vae_path is not None:
        encode, vae_scale = load_vae_encoder(vae_path, device)
        scale = scale or vae_scale
        name = f"diffusers.AutoencoderKL:{os.path.abspath(vae_path)}"
    else:
        if scale is None:
            raise ValueError("scale is required with a custom encode callable "
                             f"(the SD VAE's is {SD_VAE_SCALE})")
        name = getattr(encode, "__qualname__", type(encode).__name__)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    return encode, scale, name


@torch.no_grad()
def _encode_folder(loader, encode: Encoder, writer: _ShardWriter, device: torch.device,
                   on_corrupt: str, skipped: list[str], bar) -> list[int] | None:
    """Encodes every batch (and its mirror image) into the writer; the moment shape."""
    moment_shape = None
    for items in loader:
        good = []
        for item in items:
            if isinstance(item, CorruptImageError):
                if on_corrupt == "error":
                    raise item
                skipped.append(item.path)
            else:
                good.append(item)
        bar.update(len(items))
        if not good:
            continue
        pixels = torch.stack([p for p, _ in good]).to(device)  # uint8 [B, 3, H, W]
        x = pixels.float() / 127.5 - 1.0
        moments = _encode_moments(encode, x)  # [B, 2C, h, w]
        flipped = _encode_moments(encode, x.flip(-1))
        moment_shape = moment_shape or list(moments.shape[1:])
        writer.add(moments.cpu().numpy(), flipped.cpu().numpy(),
                   np.array([label for _, label in good]))
    return moment_shape


def _write_index(out_dir: str, index: dict) -> None:
    tmp_path = os.path.join(out_dir, LATENT_INDEX + ".tmp")
    with open(tmp_path, "w") as f:
        json.dump(index, f, indent=1)
    os.replace(tmp_path, os.path.join(out_dir, LATENT_INDEX))


def prepare_latents(image_folder: str, out_dir: str, *, encode: Encoder | None = None,
                    vae_path: str | None = None, scale: float | None = None,
                    resolution: int = 256, batch_size: int = 32, shard_size: int = 8192,
                    dtype: str = "float16", device: torch.device | str = "cpu",
                    on_corrupt: str = "error", num_workers: int = 2, overwrite: bool = False,
                    progress: bool = True) -> dict:
    """Encodes every image of `image_folder` (and its mirror image) into shards in `out_dir`.

    Give `vae_path` (a local diffusers AutoencoderKL folder; scale from its config) or an
    `encode` callable with its `scale`. Returns the index that was written.
    """
    from tqdm.auto import tqdm

    _check_prepare_args(encode, vae_path, dtype, on_corrupt, {
        "resolution": resolution, "batch_size": batch_size, "shard_size": shard_size},
        out_dir, overwrite)
    device = torch.device(device)
    folder, skipped = usable_images(image_folder, "error", num_workers)  # lists; no scan
    encode, scale, encoder_name = _resolve_encoder(encode, vae_path, scale, device)
    os.makedirs(out_dir, exist_ok=True)
    loader = torch.utils.data.DataLoader(
        _TolerantDataset(ImageFolderDataset(folder, resolution)), batch_size=batch_size,
        num_workers=num_workers, collate_fn=_as_list,
        **worker_options(num_workers, persistent=False))
    writer = _ShardWriter(out_dir, shard_size, np.dtype(dtype))
    with tqdm(total=len(folder.paths), desc="prepare-latents", unit="img",
              disable=not progress or None) as bar:
        moment_shape = _encode_folder(loader, encode, writer, device, on_corrupt, skipped, bar)
    writer.close()
    if moment_shape is None:
        raise ValueError(f"no readable images in {image_folder!r}")
    index = {
        "format": LATENT_FORMAT, "version": 1, "count": sum(s["count"] for s in writer.shards),
        "moment_shape": moment_shape, "latent_shape": [moment_shape[0] // 2] + moment_shape[1:],
        "dtype": dtype, "scale": float(scale), "class_names": folder.class_names,
        "num_classes": len(folder.class_names), "shards": writer.shards,
        "provenance": {
            "tool": "sddit prepare-latents", "source": os.path.abspath(image_folder),
            "encoder": encoder_name, "resolution": resolution, "crop": "adm-center",
            "skipped": skipped, "num_skipped": len(skipped), "torch": torch.__version__,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    _write_index(out_dir, index)
    if skipped:
        print(f"prepare-latents: skipped {len(skipped)} unreadable image(s), listed in the index")
    return index


def _encode_moments(encode: Encoder, x: torch.Tensor) -> torch.Tensor:
    mean, logvar = encode(x)
    if mean.shape != logvar.shape or mean.ndim != 4 or mean.shape[0] != x.shape[0]:
        raise ValueError(f"encode must return (mean, logvar) of one shape [B, C, h, w] with "
                         f"B={x.shape[0]}, got {tuple(mean.shape)} and {tuple(logvar.shape)}")
    return torch.cat([mean, logvar], dim=1).float()


def add_prepare_latents_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prepare-latents", help="encode an image folder into sharded VAE latents",
        description="Encode root/<class>/<image> with a local diffusers AutoencoderKL into "
                    "sharded .npy latent moments (and flipped copies) plus index.json.")
    parser.add_argument("image_folder", help="image folder root/<class>/<image>")
    parser.add_argument("out_dir", help="output folder for the shards and index.json")
    parser.add_argument("--vae", required=True, dest="vae_path",
                        help="local folder of a diffusers AutoencoderKL (e.g. the SD VAE)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=8192)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--scale", type=float, default=None,
                        help="latent scale to record (default: the VAE config's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--on-corrupt", choices=("error", "skip"), default="error")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(func=run_prepare_latents)
    return parser


def run_prepare_latents(args: argparse.Namespace) -> int:
    """The CLI entry: a bad argument or path is reported in one line, exit status 2."""
    try:
        index = prepare_latents(
            args.image_folder, args.out_dir, vae_path=args.vae_path, scale=args.scale,
            resolution=args.resolution, batch_size=args.batch_size, shard_size=args.shard_size,
            dtype=args.dtype, device=args.device, on_corrupt=args.on_corrupt,
            num_workers=args.num_workers, overwrite=args.overwrite)
    except (OSError, ImportError, ValueError) as exc:  # OSError covers CorruptImageError
        print(f"sddit prepare-latents: {exc}", file=sys.stderr)
        return 2
    print(f"prepare-latents: wrote {index['count']} latents {index['latent_shape']} in "
          f"{len(index['shards'])} shard(s) to {args.out_dir}")
    return 0
