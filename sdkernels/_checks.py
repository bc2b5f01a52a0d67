"""Input validation shared by the public ops: clear errors before any kernel runs."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_float(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    return t


def check_index(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    return t


def check_shape(name: str, t: torch.Tensor, expected: tuple[int | None, ...], what: str) -> None:
    """`expected` holds sizes, or None for "any"; `what` spells it, e.g. "[B, T, D]"."""
    ok = t.dim() == len(expected) and all(
        e is None or s == e for s, e in zip(t.shape, expected, strict=True)
    )
    if not ok:
        raise ValueError(f"{name} must have shape {what}, got {list(t.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    named = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in named.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in named.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    named = {k: v for k, v in tensors.items() if v is not None}
    dtypes = {v.dtype for v in named.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{k} is {v.dtype}" for k, v in named.items())
        raise TypeError(f"float inputs must share one dtype, got {listing}")
