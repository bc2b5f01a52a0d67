"""Checkpoints: atomic, checksummed writes; keep-last-N; timelines; RNG capture; loading.

A checkpoint is one `ckpt-<step>.pt` file in the run folder holding the model (with
SD-DiT's teacher and center, which are part of the model's state), the sampling EMA, the
optimizer, the step, every rank's RNG states, the data position, and the resolved config.
Everything in it is a tensor or a plain Python value, so it loads with weights_only=True.

Why each rule holds:
- Atomic: the file is written to a hidden temporary beside its final name, fsynced, then
  renamed; a crash at any moment leaves either the old set or the new one. Temporaries a
  killed process left behind are removed by the next run in that folder.
- Checksummed: torch's zip reader does not check its CRCs, so flipped bytes load silently
  as wrong weights. Each checkpoint has a `ckpt-<step>.pt.sha256` beside it (written and
  renamed into place before the checkpoint itself); loading verifies it and a mismatch,
  a truncated or empty file, or a missing checksum raises CorruptCheckpointError naming
  the file.
- Keep-last-N never removes the file just written, nor any checkpoint newer than it (those
  belong to another timeline: see `archive`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import re
import time
from typing import Any

import numpy as np
import torch
from torch import nn

CKPT_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")
TMP_PATTERN = re.compile(r"^\.ckpt-\d+\.pt(?:\.sha256)?\.tmp-(\d+)$")
FORMAT_VERSION = 2
_HASH_CHUNK = 16 << 20


class CorruptCheckpointError(ValueError):
    """A checkpoint file that is empty, truncated, altered, or not an sddit checkpoint."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, permissions); nothing was replaced."""


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"ckpt-{step:08d}.pt")


def checksum_path(path: str) -> str:
    return path + ".sha256"


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of finished checkpoints, oldest first; temporaries are ignored."""
    if not os.path.isdir(run_dir):
        return []
    found = []
    for name in os.listdir(run_dir):
        match = CKPT_PATTERN.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(run_dir, name)))
    return sorted(found)


def latest_checkpoint(path: str) -> str | None:
    """`path` itself if it is a file, else the newest checkpoint in that folder (not
    verified: see `latest_valid_checkpoint`)."""
    if os.path.isfile(path):
        return path
    found = list_checkpoints(path)
    return found[-1][1] if found else None


def latest_valid_checkpoint(run_dir: str) -> tuple[str | None, list[CorruptCheckpointError]]:
    """The newest checkpoint in `run_dir` whose checksum verifies, and the newer ones that
    did not (each error names its file and why)."""
    skipped: list[CorruptCheckpointError] = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(path)
        except CorruptCheckpointError as exc:
            skipped.append(exc)
            continue
        return path, skipped
    return None, skipped


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot open a folder
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _write_synced(path: str, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary beside `path`, fsync, write its checksum file, then rename
    the checkpoint into place. A failure at any point removes the temporaries."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    sum_final = checksum_path(path)
    sum_tmp = os.path.join(directory, f".{os.path.basename(sum_final)}.tmp-{os.getpid()}")
    try:
        _write_synced(tmp, lambda f: torch.save(obj, f))
        line = f"{file_sha256(tmp)}  {os.path.getsize(tmp)}\n".encode()
        _write_synced(sum_tmp, lambda f: f.write(line))
        os.replace(sum_tmp, sum_final)
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, sum_tmp):
            with contextlib.suppress(OSError):
                os.remove(leftover)
        raise
    _fsync_dir(directory)


def verify_checkpoint(path: str) -> None:
    """Raises CorruptCheckpointError unless `path` matches its checksum file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = os.path.getsize(path)
    if size == 0:
        raise CorruptCheckpointError(path, "the file is empty")
    try:
        with open(checksum_path(path)) as f:
            expected, expected_size = f.read().split()
    except (OSError, ValueError):
        raise CorruptCheckpointError(path, "not an sddit checkpoint, or one whose checksum "
                                     f"file {checksum_path(path)} is missing") from None
    if size != int(expected_size):
        raise CorruptCheckpointError(path, f"truncated or extended: {size} bytes, the "
                                     f"checksum file says {expected_size}")
    if file_sha256(path) != expected:
        raise CorruptCheckpointError(path, "its contents do not match its sha256 checksum "
                                     "(the file was altered or damaged)")


def save_checkpoint(run_dir: str, step: int, payload: dict[str, Any], keep_last: int) -> str:
    """Writes ckpt-<step>.pt atomically, then prunes older checkpoints so that `keep_last`
    remain, counting the new one. Newer files (another timeline) are never touched."""
    path = checkpoint_path(run_dir, step)
    try:
        atomic_save({"format": FORMAT_VERSION, "step": step, **payload}, path)
    except OSError as exc:
        raise CheckpointWriteError(
            exc.errno, f"could not write checkpoint {path} ({exc}); the earlier checkpoints "
            f"in {run_dir} are untouched") from exc
    older = [p for s, p in list_checkpoints(run_dir) if s < step]
    for old in older[: max(len(older) - (keep_last - 1), 0)]:
        for victim in (old, checksum_path(old)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(victim)
    return path


def load_checkpoint(path: str) -> dict[str, Any]:
    """A verified checkpoint's contents; CorruptCheckpointError names a bad file."""
    verify_checkpoint(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a file it cannot read
        raise CorruptCheckpointError(path, f"cannot be read as a checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CorruptCheckpointError(path, f"not an sddit checkpoint (format {FORMAT_VERSION})")
    return state


def load_step(path: str) -> int:
    """The step of a checkpoint: from its name when it has the standard one."""
    match = CKPT_PATTERN.match(os.path.basename(path))
    return int(match.group(1)) if match else int(load_checkpoint(path)["step"])


def archive_checkpoints(run_dir: str, paths: list[str], label: str) -> str:
    """Moves checkpoints (with their checksum files) into run_dir/<label>-<UTC time>/,
    keeping them; returns that folder."""
    folder = os.path.join(run_dir, f"{label}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    os.makedirs(folder, exist_ok=True)
    for path in paths:
        for item in (path, checksum_path(path)):
            if os.path.exists(item):
                os.replace(item, os.path.join(folder, os.path.basename(item)))
    _fsync_dir(run_dir)
    return folder


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphaned_temporaries(run_dir: str) -> list[str]:
    """Deletes temporaries of saves whose writer process is gone (killed mid-save)."""
    removed = []
    if not os.path.isdir(run_dir):
        return removed
    for name in os.listdir(run_dir):
        match = TMP_PATTERN.match(name)
        if match and not _pid_alive(int(match.group(1))):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(run_dir, name))
                removed.append(name)
    return removed


# ----------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """This process's generators, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- sampling


def build_net(build: dict[str, Any], device: torch.device) -> nn.Module:
    """model.build from the name and resolved overrides a checkpoint records; the kernel
    path follows the device it will run on."""
    import model

    overrides = dict(build["overrides"])
    overrides["use_kernels"] = device.type == "cuda"
    return model.build(build["name"], **overrides)


def load_sampling_model(path: str, device: torch.device | str) -> tuple[nn.Module, dict]:
    """The sampling-EMA network of a checkpoint (file, or run folder: its newest) in eval
    mode on `device`, and metadata with 'step', 'config', 'images_seen', 'path', 'latents'."""
    device = torch.device(device)
    resolved = latest_checkpoint(path)
    if resolved is None:
        raise FileNotFoundError(f"no checkpoint found at {path}")
    state = load_checkpoint(resolved)
    net = build_net(state["model_build"], device)
    net.load_state_dict(state["ema"])
    net = net.to(device).eval().requires_grad_(False)
    meta = {
        "step": state["step"],
        "config": state["config"],
        "images_seen": state.get("images_seen", 0),
        "path": resolved,
        "model_build": state["model_build"],
        "latents": state.get("latents"),  # a latent run's VAE folder and scale (train/loop.py)
    }
    return net, meta
