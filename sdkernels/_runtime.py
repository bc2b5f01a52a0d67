"""Where a fused op runs: Triton (CUDA, or the Triton interpreter on CPU) or torch.

The decision is made per call from the tensors' devices, so the same model code runs
on a GPU, through the interpreter in tests, and on a plain CPU via the references.
`force_backend` overrides it (tests of the fallback path, A/B benchmarks).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch

Backend = Literal["triton", "reference"]

HAS_TRITON: bool = importlib.util.find_spec("triton") is not None
_forced: Backend | None = None


def interpreter_active() -> bool:
    """True when Triton kernels execute through the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device: what the launchers size grids by."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the Triton kernels should run for these tensors."""
    if _forced is not None:
        return _forced == "triton"
    if not HAS_TRITON:
        return False
    devices = {t.device.type for t in tensors}
    if devices == {"cuda"}:
        return True
    return devices == {"cpu"} and interpreter_active()


@contextmanager
def force_backend(backend: Backend | None) -> Iterator[None]:
    """Run every sdkernels op inside the block on `backend` (None restores auto)."""
    global _forced
    if backend not in (None, "triton", "reference"):
        raise ValueError(f"backend must be 'triton', 'reference' or None, got {backend!r}")
    previous, _forced = _forced, backend
    try:
        yield
    finally:
        _forced = previous


def current_backend(*tensors: torch.Tensor) -> Backend:
    return "triton" if use_triton(*tensors) else "reference"


_poison: bool = False


@contextmanager
def poison_outputs(enabled: bool = True) -> Iterator[None]:
    """Fill every buffer a launcher allocates with NaN (floats) or -1 (ints), so that an
    element a kernel forgets to write shows up in tests instead of passing by luck."""
    global _poison
    previous, _poison = _poison, enabled
    try:
        yield
    finally:
        _poison = previous


def empty(
    shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Launchers allocate outputs and scratch through this, never torch.empty directly."""
    if not _poison:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)
