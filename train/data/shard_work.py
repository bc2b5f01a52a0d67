"""How `prepare-latents` splits its work: fixed shards, shared by ranks, resumable.

Shard k holds the images [k * shard_size, (k + 1) * shard_size) of the folder's sorted
list (fewer when unreadable files are skipped), so the shards do not depend on how many
processes wrote them: under torchrun each rank encodes its own shards, batched within the
shard, and the files equal a one-process run's.

Every shard is written atomically (each .npy to a temporary, then renamed) and then a
marker `shard_<k>.done.json` says it is complete. A run that was stopped (Ctrl-C, a lost
node, a time limit) leaves its finished shards with markers; rerunning the same command
checks that `prepare.json` (what the shards were made from) matches, and encodes only the
shards that have no valid marker, shared again among the ranks of the new run. The
index is written by `train.data.latents` once every shard is done.

Collectives: with a torch.distributed group, rank 0 decides (what to reuse, or the error)
and broadcasts the decision, so that every rank raises the same error instead of one rank
raising while the others wait. The ranks must share the output folder (one file system).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch.distributed as dist

PLAN_FILE = "prepare.json"
MARKER_SUFFIX = ".done.json"


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def broadcast_from_rank0(value: Any) -> Any:
    """rank 0's `value` on every rank (itself without a process group)."""
    if rank_world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


def paths_digest(paths: Sequence[str], labels: Sequence[int]) -> str:
    """A short hash of the folder's listing: shards are reusable only for the same files."""
    digest = hashlib.sha256()
    for path, label in zip(paths, labels, strict=True):
        digest.update(f"{path}\0{int(label)}\n".encode())
    return digest.hexdigest()[:16]


def shard_files(k: int) -> dict[str, str]:
    stem = f"shard_{k:05d}"
    return {"moments": f"{stem}_moments.npy", "moments_flip": f"{stem}_moments_flip.npy",
            "labels": f"{stem}_labels.npy", "marker": stem + MARKER_SUFFIX}


def shard_range(k: int, count: int, shard_size: int) -> range:
    return range(k * shard_size, min((k + 1) * shard_size, count))


def num_shards(count: int, shard_size: int) -> int:
    return -(-count // shard_size)


def batches_of(shards: Sequence[int], count: int, shard_size: int, batch_size: int
               ) -> list[tuple[int, list[int]]]:
    """(shard, image indices) batches in order; a batch never crosses a shard's end, so a
    shard is encoded in the same batches whichever rank does it."""
    out = []
    for k in shards:
        indices = list(shard_range(k, count, shard_size))
        out += [(k, indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
    return out


def _save_atomic(path: str, array: np.ndarray) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_json_atomic(path: str, record: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def save_shard(out_dir: str, k: int, arrays: dict[str, np.ndarray], skipped: list[str]) -> dict:
    """Writes shard k's arrays (moments, moments_flip, labels), then its marker; returns the
    marker. A shard whose every image was unreadable has a marker and no arrays."""
    files = shard_files(k)
    count = len(arrays["labels"])
    marker = {"shard": k, "count": count, "skipped": skipped, "moment_shape": None}
    if count:
        for key in ("moments", "moments_flip", "labels"):
            _save_atomic(os.path.join(out_dir, files[key]), arrays[key])
            marker[key] = files[key]
        marker["moment_shape"] = list(arrays["moments"].shape[1:])
    write_json_atomic(os.path.join(out_dir, files["marker"]), marker)
    return marker


def read_marker(out_dir: str, k: int) -> dict | None:
    """Shard k's marker when the shard is complete and its files agree with it, else None."""
    path = os.path.join(out_dir, shard_files(k)["marker"])
    try:
        with open(path) as f:
            marker = json.load(f)
        for key in ("moments", "moments_flip", "labels") if marker["count"] else ():
            array = np.load(os.path.join(out_dir, marker[key]), mmap_mode="r")
            if len(array) != marker["count"]:
                return None
    except (OSError, ValueError, KeyError):
        return None
    return marker


def remove_outputs(out_dir: str, names: Sequence[str]) -> None:
    """Deletes this tool's own files (index, plan, shards, markers) and nothing else."""
    ours = set(names) | {PLAN_FILE}
    for name in os.listdir(out_dir):
        if name in ours or (name.startswith("shard_") and (
                name.endswith(".npy") or name.endswith(MARKER_SUFFIX))):
            os.remove(os.path.join(out_dir, name))


def plan_differences(saved: dict, plan: dict) -> list[str]:
    return [f"{key}: {saved.get(key)!r} -> {plan[key]!r}" for key in plan
            if saved.get(key) != plan[key]]


def claim_folder(out_dir: str, plan: dict, overwrite: bool, index_name: str) -> list[int]:
    """On rank 0: prepares `out_dir` for `plan` and returns the shards already done.
    Raises when the folder holds a finished index, or shards of another plan, and
    `overwrite` is off."""
    os.makedirs(out_dir, exist_ok=True)
    plan_path = os.path.join(out_dir, PLAN_FILE)
    if overwrite:
        remove_outputs(out_dir, [index_name])
    elif os.path.exists(os.path.join(out_dir, index_name)):
        raise FileExistsError(f"out_dir {out_dir!r} already holds a {index_name}; "
                              "pass overwrite=True (--overwrite) to replace it")
    elif os.path.isfile(plan_path):
        with open(plan_path) as f:
            saved = json.load(f)
        changed = plan_differences(saved, plan)
        if changed:
            raise FileExistsError(
                f"out_dir {out_dir!r} holds shards of another prepare-latents run "
                f"({'; '.join(changed)}): rerun with the same arguments to continue it, or "
                "pass --overwrite to start over")
    write_json_atomic(plan_path, plan)
    total = num_shards(plan["count"], plan["shard_size"])
    return [k for k in range(total) if read_marker(out_dir, k) is not None]
