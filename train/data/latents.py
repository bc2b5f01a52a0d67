"""`sddit prepare-latents`: encode an image folder with a VAE into sharded latent moments;
reading them back; and which VAE turns a latent run's samples back into images.

Layout of the output folder (read back by `LatentShards`):
- `shard_00000_moments.npy`       [n, 2C, h, w]  mean and logvar of each image, concatenated
- `shard_00000_moments_flip.npy`  [n, 2C, h, w]  the same for the horizontally flipped image
- `shard_00000_labels.npy`        [n] int64
- `shard_00000.done.json`: the shard's completion marker; `prepare.json`: what the shards
  are made from (both for resuming, train/data/shard_work.py)
- `index.json`: format, count, moment/latent shapes, dtype, scale, class names, the shard
  list, the VAE folder (`vae_path`), and provenance (source folder, encoder, resolution,
  skipped files, versions).
The index is written last and atomically, so a folder with an index is complete.

The VAE is diffusers' `AutoencoderKL`, loaded only from a local path; nothing is downloaded.
Any callable `encode(x [B, 3, H, W] in [-1, 1]) -> (mean, logvar)` can stand in for it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, is_dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from train.data.images import (
    CorruptImageError,
    ImageFolder,
    ImageFolderDataset,
    usable_images,
)
from train.data.shard_work import (
    barrier,
    batches_of,
    broadcast_from_rank0,
    claim_folder,
    num_shards,
    paths_digest,
    plan_differences,
    rank_world,
    read_marker,
    save_shard,
    shard_range,
    write_json_atomic,
)
from train.data.sources import worker_options
from train.data.vae import LatentDecoder, VaeSpec, VaeUnavailableError, load_autoencoder

Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
SD_VAE_SCALE = 0.18215
LATENT_INDEX = "index.json"
LATENT_FORMAT = "sddit-latent-shards"
VAE_ENCODER_PREFIX = "diffusers.AutoencoderKL:"  # the provenance name of a VAE folder encoder


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


# ----------------------------------------------------------------------------- the run's VAE


def read_index(latent_dir: str) -> dict | None:
    """A latent folder's index, or None where there is none (e.g. a run moved elsewhere)."""
    try:
        with open(os.path.join(latent_dir, LATENT_INDEX)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def index_vae_folder(index: Mapping[str, Any]) -> str | None:
    """The VAE folder an index was encoded with: its `vae_path`, or for indexes written
    before that was recorded, the folder in the provenance's encoder name."""
    if index.get("vae_path"):
        return str(index["vae_path"])
    encoder = str(index.get("provenance", {}).get("encoder", ""))
    return encoder.removeprefix(VAE_ENCODER_PREFIX) if encoder.startswith(
        VAE_ENCODER_PREFIX) else None


def _data_table(data: Any) -> dict[str, Any]:
    return asdict(data) if is_dataclass(data) else dict(data)


def run_vae_spec(data: Any, *, recorded: Mapping[str, Any] | None = None,
                 override: str | None = None, flag: str = "--vae PATH") -> VaeSpec | None:
    """The VAE that turns a run's samples into images; None for a run on pixels.

    `data` is the run's data config (a DataConfig or its table from a checkpoint),
    `recorded` what the checkpoint recorded at training ({"vae", "scale"}), `override` a
    folder given on the command line. The folder is the first of override, recorded,
    data.vae and the latent index's; the scale the first of recorded, data.latent_scale and
    the index's. Raises VaeUnavailableError, naming the folder looked for and `flag`, when
    the folder is not there: a latent run's samples are never written as images undecoded.
    """
    table = _data_table(data)
    if table.get("source") != "latents":
        return None
    recorded = recorded or {}
    index_dir = str(table.get("path") or "")
    index = read_index(index_dir) if index_dir else None
    candidates = [(override, f"given as {flag}"), (recorded.get("vae"), "recorded in the "
                  "checkpoint"), (table.get("vae") or None, "data.vae in the run's config"),
                  (index and index_vae_folder(index), f"recorded in {index_dir}/{LATENT_INDEX}")]
    folder, source = next(((f, s) for f, s in candidates if f), (None, None))
    scale = recorded.get("scale") or table.get("latent_scale") or (index or {}).get("scale")
    where = (f"its latent index {index_dir}/{LATENT_INDEX} is not here" if index is None else
             f"its latent index names the encoder "
             f"{index.get('provenance', {}).get('encoder')!r}, not a VAE folder")
    if folder is None:
        raise VaeUnavailableError(
            f"this run was trained on latents, so its samples must be decoded by its VAE, but "
            f"no VAE folder is known ({where}): give the folder of its diffusers "
            f"AutoencoderKL with {flag}. Nothing was sampled.")
    if not os.path.isdir(folder):
        raise VaeUnavailableError(
            f"this run was trained on latents, so its samples must be decoded by its VAE, but "
            f"the VAE folder {folder!r} ({source}) is not there: give it with {flag}. "
            "Nothing was sampled.")
    if not scale:
        raise VaeUnavailableError(
            f"the latent scale of this run is unknown: the checkpoint records none, "
            f"data.latent_scale is unset and {where}. Copy {LATENT_INDEX} back to "
            f"{index_dir or 'data.path'} or set data.latent_scale.")
    return VaeSpec(os.path.abspath(folder), float(scale))


def run_decoder(data: Any, device: torch.device | str, *, recorded: Mapping | None = None,
                override: str | None = None, flag: str = "--vae PATH", batch_size: int = 32
                ) -> LatentDecoder | None:
    """`run_vae_spec`'s VAE loaded on `device` as a LatentDecoder; None for a pixel run."""
    spec = run_vae_spec(data, recorded=recorded, override=override, flag=flag)
    return None if spec is None else LatentDecoder(spec, device, batch_size, f"the VAE ({flag})")


def load_vae_encoder(vae_path: str, device: torch.device | str = "cpu",
                     dtype: torch.dtype = torch.float32) -> tuple[Encoder, float]:
    """diffusers AutoencoderKL from a local folder -> (encode, scaling factor)."""
    vae = load_autoencoder(vae_path, device, dtype)
    scale = float(getattr(vae.config, "scaling_factor", SD_VAE_SCALE))

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = vae.encode(x.to(dtype)).latent_dist
        return posterior.mean, posterior.logvar

    return encode, scale


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


def _check_prepare_args(encode, vae_path, dtype: str, on_corrupt: str, sizes: dict) -> None:
    if (encode is None) == (vae_path is None):
        raise ValueError("give exactly one of vae_path (a local AutoencoderKL folder) or encode")
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    if on_corrupt not in ("error", "skip"):
        raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _resolve_encoder(encode: Encoder | None, vae_path: str | None, scale: float | None,
                     device: torch.device) -> tuple[Encoder, float, str]:
    """(encode, scale, a name for the provenance record)."""
    if vae_path is not None:
        encode, vae_scale = load_vae_encoder(vae_path, device)
        scale = scale or vae_scale
        name = f"{VAE_ENCODER_PREFIX}{os.path.abspath(vae_path)}"
    else:
        if scale is None:
            raise ValueError("scale is required with a custom encode callable "
                             f"(the SD VAE's is {SD_VAE_SCALE})")
        name = getattr(encode, "__qualname__", type(encode).__name__)
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    return encode, scale, name


class _ShardBuffer:
    """The encoded batches of the shards in progress on this rank, written when complete."""

    def __init__(self, out_dir: str, dtype: np.dtype, sizes: dict[int, int]):
        self.out_dir, self.dtype = out_dir, dtype
        self.left = dict(sizes)  # shard -> images not yet seen
        self.parts: dict[int, dict[str, list[np.ndarray]]] = {}
        self.skipped: dict[int, list[str]] = {}

    def add(self, k: int, seen: int, arrays: dict[str, np.ndarray] | None,
            skipped: list[str]) -> None:
        parts = self.parts.setdefault(k, {"moments": [], "moments_flip": [], "labels": []})
        if arrays is not None:
            for key, array in arrays.items():
                parts[key].append(array)
        self.skipped.setdefault(k, []).extend(skipped)
        self.left[k] -= seen
        if self.left[k] == 0:
            self._write(k)

    def _write(self, k: int) -> None:
        parts = self.parts.pop(k)
        arrays = {"labels": np.concatenate(parts["labels"]).astype(np.int64)
                  if parts["labels"] else np.zeros(0, np.int64)}
        for key in ("moments", "moments_flip"):
            arrays[key] = (np.concatenate(parts[key]).astype(self.dtype)
                           if parts[key] else np.zeros(0, self.dtype))
        save_shard(self.out_dir, k, arrays, self.skipped.pop(k))


@torch.no_grad()
def _encode_work(dataset: _TolerantDataset, work: list[tuple[int, list[int]]], encode: Encoder,
                 device: torch.device, on_corrupt: str, num_workers: int,
                 buffer: _ShardBuffer, bar) -> int:
    """Encodes this rank's batches (each image and its mirror image) into the shard buffer;
    returns the number of images encoded."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=[indices for _, indices in work], num_workers=num_workers,
        collate_fn=_as_list, **worker_options(num_workers, persistent=False))
    world = rank_world()[1]
    encoded = 0
    for (k, indices), items in zip(work, loader, strict=True):
        good, skipped = [], []
        for item in items:
            if isinstance(item, CorruptImageError):
                if on_corrupt == "error":
                    raise item
                skipped.append(item.path)
            else:
                good.append(item)
        arrays = None
        if good:
            pixels = torch.stack([p for p, _ in good]).to(device)  # uint8 [B, 3, H, W]
            x = pixels.float() / 127.5 - 1.0
            arrays = {"moments": _encode_moments(encode, x).cpu().numpy(),
                      "moments_flip": _encode_moments(encode, x.flip(-1)).cpu().numpy(),
                      "labels": np.array([label for _, label in good])}
            encoded += len(good)
        buffer.add(k, len(indices), arrays, skipped)
        bar.update(len(indices) * world)  # every rank moves at about this pace
    return encoded


def _write_index(out_dir: str, index: dict) -> None:
    write_json_atomic(os.path.join(out_dir, LATENT_INDEX), index)


def _assemble_index(out_dir: str, plan: dict, folder: ImageFolder, vae_path: str | None) -> dict:
    """The index of a folder whose every shard has a marker (rank 0, after the others)."""
    markers = [read_marker(out_dir, k) for k in range(num_shards(plan["count"],
                                                                 plan["shard_size"]))]
    missing = [k for k, m in enumerate(markers) if m is None]
    if missing:
        raise RuntimeError(f"{out_dir}: shards {missing[:10]} are not complete after every "
                           "rank finished; rerun the same command to encode them")
    shards = [{key: m[key] for key in ("moments", "moments_flip", "labels", "count")}
              for m in markers if m["count"]]
    if not shards:
        raise ValueError(f"no readable images in {plan['source']!r}")
    skipped = [path for m in markers for path in m["skipped"]]
    moment_shape = next(m["moment_shape"] for m in markers if m["count"])
    return {
        "format": LATENT_FORMAT, "version": 1, "count": sum(s["count"] for s in shards),
        "moment_shape": moment_shape, "latent_shape": [moment_shape[0] // 2] + moment_shape[1:],
        "dtype": plan["dtype"], "scale": float(plan["scale"]),
        "class_names": folder.class_names, "num_classes": len(folder.class_names),
        "shards": shards, "vae_path": vae_path and os.path.abspath(vae_path),
        "provenance": {
            "tool": "sddit prepare-latents", "source": plan["source"], "encoder": plan["encoder"],
            "resolution": plan["resolution"], "crop": "adm-center", "skipped": skipped,
            "num_skipped": len(skipped), "torch": torch.__version__,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }


def _agree_on_plan(out_dir: str, plan: dict, overwrite: bool) -> list[int]:
    """Every rank checks it sees rank 0's folder listing; rank 0 claims out_dir. Returns the
    shards already done; on every rank, the same error when something is wrong."""
    plans = [plan]
    if rank_world()[1] > 1:
        plans = [None] * rank_world()[1]
        dist.all_gather_object(plans, plan)
    if any(p != plans[0] for p in plans):
        raise ValueError("the ranks see different image folders or settings: "
                         + "; ".join(plan_differences(plans[0], p) for p in plans if p != plans[0]))
    decision: list[int] | Exception | None = None
    if rank_world()[0] == 0:
        try:
            decision = claim_folder(out_dir, plan, overwrite, LATENT_INDEX)
        except OSError as exc:
            decision = exc
    decision = broadcast_from_rank0(decision)
    if isinstance(decision, Exception):
        raise decision
    return decision


def prepare_latents(image_folder: str, out_dir: str, *, encode: Encoder | None = None,
                    vae_path: str | None = None, scale: float | None = None,
                    resolution: int = 256, batch_size: int = 32, shard_size: int = 8192,
                    dtype: str = "float16", device: torch.device | str = "cpu",
                    on_corrupt: str = "error", num_workers: int = 2, overwrite: bool = False,
                    progress: bool = True) -> dict:
    """Encodes every image of `image_folder` (and its mirror image) into shards in `out_dir`.

    Give `vae_path` (a local diffusers AutoencoderKL folder; scale from its config) or an
    `encode` callable with its `scale`. Within a torch.distributed group every rank encodes
    its share of the shards and rank 0 writes the index; a folder left by an interrupted
    run is continued from its finished shards (train/data/shard_work.py). Returns the
    index, on every rank.
    """
    _check_prepare_args(encode, vae_path, dtype, on_corrupt, {
        "resolution": resolution, "batch_size": batch_size, "shard_size": shard_size})
    device = torch.device(device)
    folder, _ = usable_images(image_folder, "error", num_workers)  # lists; no scan
    encode, scale, encoder_name = _resolve_encoder(encode, vae_path, scale, device)
    plan = {"tool": "sddit prepare-latents", "source": os.path.abspath(image_folder),
            "files": paths_digest(folder.paths, folder.labels), "count": len(folder.paths),
            "class_names": folder.class_names, "resolution": resolution,
            "shard_size": shard_size, "dtype": dtype, "encoder": encoder_name,
            "scale": float(scale)}
    done = set(_agree_on_plan(out_dir, plan, overwrite))
    rank, world = rank_world()
    todo = [k for k in range(num_shards(len(folder.paths), shard_size)) if k not in done]
    if done and rank == 0:
        print(f"prepare-latents: continuing in {out_dir}: {len(done)} shard(s) already done, "
              f"{len(todo)} to encode")
    work = batches_of(todo[rank::world], len(folder.paths), shard_size, batch_size)
    sizes = {k: len(shard_range(k, len(folder.paths), shard_size)) for k in todo[rank::world]}
    buffer = _ShardBuffer(out_dir, np.dtype(dtype), sizes)
    remaining = sum(len(shard_range(k, len(folder.paths), shard_size)) for k in todo)
    started = time.perf_counter()
    with tqdm(total=remaining, desc="prepare-latents", unit="img", dynamic_ncols=True,
              disable=not progress or rank != 0 or None) as bar:
        encoded = _encode_work(_TolerantDataset(ImageFolderDataset(folder, resolution)), work,
                               encode, device, on_corrupt, num_workers, buffer, bar)
    barrier()  # every rank's shards are on disk before rank 0 reads their markers
    _report_throughput(encoded, time.perf_counter() - started)
    index = None
    if rank == 0:
        index = _assemble_index(out_dir, plan, folder, vae_path)
        _write_index(out_dir, index)
        if index["provenance"]["skipped"]:
            print(f"prepare-latents: skipped {index['provenance']['num_skipped']} unreadable "
                  "image(s), listed in the index")
    return broadcast_from_rank0(index)


def _report_throughput(encoded: int, seconds: float) -> None:
    """Images encoded per second over every rank (each image is encoded twice: as it is and
    mirrored), printed by rank 0; collective under torch.distributed."""
    counts = [(encoded, seconds)]
    if rank_world()[1] > 1:
        counts = [None] * rank_world()[1]
        dist.all_gather_object(counts, (encoded, seconds))
    if rank_world()[0] != 0 or not encoded:
        return
    total, slowest = sum(n for n, _ in counts), max(s for _, s in counts)
    print(f"prepare-latents: encoded {total} images (and their mirror images) in "
          f"{slowest:.1f} s on {len(counts)} rank(s): {total / max(slowest, 1e-9):.1f} images/s")


def _encode_moments(encode: Encoder, x: torch.Tensor) -> torch.Tensor:
    mean, logvar = encode(x)
    if mean.shape != logvar.shape or mean.ndim != 4 or mean.shape[0] != x.shape[0]:
        raise ValueError(f"encode must return (mean, logvar) of one shape [B, C, h, w] with "
                         f"B={x.shape[0]}, got {tuple(mean.shape)} and {tuple(logvar.shape)}")
    return torch.cat([mean, logvar], dim=1).float()
