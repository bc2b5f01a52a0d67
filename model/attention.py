"""Multi-head self-attention with interchangeable backends.

Preference order, by what is importable and by the tensors at hand:
1. flash-attn `flash_attn_func`            q, k, v as [B, T, H, Dh]; CUDA, fp16/bf16
2. xformers `memory_efficient_attention`   q, k, v as [B, T, H, Dh]; CUDA, fp16/bf16
3. torch SDPA                              q, k, v as [B, H, T, Dh]; flash/cuDNN first on CUDA
4. math                                    explicit softmax(q k^T / sqrt(Dh)) v, fp32 softmax
Attention runs only over the tokens it is given (the kept tokens in masked training), so
every sample has the same length and no varlen path is needed.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

PREFERENCE = ("flash_attn", "xformers", "sdpa", "math")
_FAST_DTYPES = (torch.float16, torch.bfloat16)


@cache
def _importable_backends() -> tuple[str, ...]:
    optional = [name for name in ("flash_attn", "xformers")
                if importlib.util.find_spec(name) is not None]
    return (*optional, "sdpa", "math")


def available_attention_backends() -> list[str]:
    """Backends importable in this process, most preferred first."""
    return list(_importable_backends())


def supports(backend: str, q: torch.Tensor) -> bool:
    """Whether `backend` can run on tensors like q ([B, T, H, Dh])."""
    if backend in ("flash_attn", "xformers"):
        return q.is_cuda and q.dtype in _FAST_DTYPES and q.shape[-1] % 8 == 0
    return True


def resolve_backend(requested: str, q: torch.Tensor, available: tuple[str, ...] | None = None
                    ) -> str:
    """The backend one call runs on: the forced one, or the best that supports q."""
    available = available or _importable_backends()
    if requested != "auto":
        if requested not in available:
            raise ValueError(f"attention backend {requested!r} is not importable here; "
                             f"available: {list(available)}")
        if not supports(requested, q):
            raise RuntimeError(f"attention backend {requested!r} needs CUDA fp16/bf16 tensors "
                               f"with head dim % 8 == 0; got {q.device} {q.dtype} {tuple(q.shape)}")
        return requested
    return next(b for b in available if supports(b, q))


@cache
def _log_choice(backend: str, device_type: str, dtype: torch.dtype) -> None:
    log.info("attention backend: %s (%s, %s)", backend, device_type, dtype)


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v)  # [B, T, H, Dh]


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from xformers.ops import memory_efficient_attention

    return memory_efficient_attention(q, k, v)  # [B, T, H, Dh]


@cache
def _cuda_sdpa_order() -> list:
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
            SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, Dh]
    if q.is_cuda:
        from torch.nn.attention import sdpa_kernel

        try:
            context = sdpa_kernel(_cuda_sdpa_order(), set_priority=True)
        except TypeError:  # torch without set_priority: allow the same set, torch's order
            context = sdpa_kernel(_cuda_sdpa_order())
        with context:
            out = F.scaled_dot_product_attention(q, k, v)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)  # [B, T, H, Dh]


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale  # [B, H, T, T]
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)  # [B, T, H, Dh]


BACKENDS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "flash_attn": _flash_attn,
    "xformers": _xformers,
    "sdpa": _sdpa,
    "math": _math,
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto",
              available: tuple[str, ...] | None = None) -> tuple[torch.Tensor, str]:
    """q, k, v: [B, T, H, Dh] -> ([B, T, H, Dh], the backend used)."""
    chosen = resolve_backend(backend, q, available)
    if not torch.compiler.is_compiling():  # log once per choice, outside traced code
        _log_choice(chosen, q.device.type, q.dtype)
    return BACKENDS[chosen](q, k, v), chosen


class Attention(nn.Module):
    """Self-attention of DiT (qkv with bias, output projection)."""

    def __init__(self, dim: int, num_heads: int, backend: str = "auto") -> None:
        super().__init__()
        if backend != "auto" and backend not in available_attention_backends():
            raise ValueError(f"attention backend {backend!r} is not importable here; "
                             f"available: {available_attention_backends()}")
        self.num_heads = num_heads
        self.backend = backend
        self.available = _importable_backends()  # looked up once, not per call
        self.last_backend: str | None = None  # what the latest forward ran on
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)  # [B, T, 3, H, Dh]
        q, k, v = qkv.unbind(dim=2)  # each [B, T, H, Dh]
        out, self.last_backend = attention(q, k, v, self.backend, self.available)
        return self.proj(out.reshape(B, T, D))  # [B, T, D]
