"""Checkpoints: atomic writes, keep-last-N, RNG capture, and loading a net for sampling.

A checkpoint is one `ckpt-<step>.pt` file in the run folder holding the model (with
SD-DiT's teacher and center, which are part of the model's state), the sampling EMA, the
optimizer, the step, every rank's RNG states, the data position, and the resolved config.
It is written to a hidden temporary file in the same folder, fsynced, then renamed over
the final name, so a crash at any moment leaves either the old set or the new one.
Everything in it is a tensor or a plain Python value, so it loads with weights_only=True.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from typing import Any

import numpy as np
import torch
from torch import nn

CKPT_PATTERN = re.compile(r"^ckpt-(\d+)\.pt$")
FORMAT_VERSION = 1


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"ckpt-{step:08d}.pt")


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
    """`path` itself if it is a file, else the newest checkpoint in that folder."""
    if os.path.isfile(path):
        return path
    found = list_checkpoints(path)
    return found[-1][1] if found else None


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot open a folder
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file beside `path`, fsync, then os.replace."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(directory)


def save_checkpoint(run_dir: str, step: int, payload: dict[str, Any], keep_last: int) -> str:
    """Writes ckpt-<step>.pt atomically, then deletes all but the newest `keep_last`."""
    path = checkpoint_path(run_dir, step)
    atomic_save({"format": FORMAT_VERSION, "step": step, **payload}, path)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(old)
    return path


def load_checkpoint(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} is not an sddit checkpoint (format {FORMAT_VERSION})")
    return state


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
    mode on `device`, and metadata with 'step', 'config', 'images_seen', 'path'."""
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
    }
    return net, meta
