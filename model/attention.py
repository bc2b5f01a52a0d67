"""Multi-head self-attention with interchangeable backends.

Preference order, by what is importable and by the tensors at hand:
1. flash-attn `flash_attn_func`            q, k, v as [B, T, H, Dh]; CUDA, fp16/bf16
2. xformers `memory_efficient_attention`   q, k, v as [B, T, H, Dh]; CUDA, fp16/bf16
3. torch SDPA                              q, k, v as [B, H, T, Dh]; flash/cuDNN first on CUDA
4. math                                    plain softmax(q k^T / sqrt(Dh)) v, fp32 softmax
Attention runs only over the tokens it is given (the kept tokens in masked training), so
every sample has the same length and no varlen path is needed.

`attention="auto"` is measured, not assumed, per shape (B, T, H, Dh, dtype, and whether
a backward follows): forward plus backward when q needs a grad, forward alone otherwise
(sampling may choose differently from training). The fastest candidate is cached per
shape for the process; `attention_choices()` reports every decision with its timings.
- CUDA: flash-attn and xformers when importable, and SDPA pinned to each of its flash,
  cuDNN and memory-efficient kernels (for head dim 72 flash pads to 96, and on H100 cuDNN
  is often faster). Timed with CUDA events at the first eager call; where timing cannot
  run (torch.compile tracing, CUDA-graph capture) a cached choice is used, else the
  static order above.
- CPU: torch SDPA as dispatched (its CPU flash kernel), SDPA pinned to its math kernel,
  and the plain math path, timed with the wall clock. The bf16 CPU flash backward can be
  several times slower than the math paths, so forward and backward are timed together.
  Under torch.compile the measurement runs once at trace time on fresh tensors of the
  traced shape (`_traced_cpu_choice`), so a compiled step also gets a measured backend
  and no graph break.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

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


def _sdpa_pinned(kernel: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """SDPA restricted to one kernel ("FLASH_ATTENTION", ...): it errors if unsupported."""
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, Dh]
        with sdpa_kernel([getattr(SDPBackend, kernel)]):
            out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2)  # [B, T, H, Dh]

    run.__name__ = f"_sdpa_{kernel.lower()}"
    return run


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # Batched matmuls over [B, H, T, Dh] views: BLAS takes the transposes as they are, so
    # no operand is copied to a contiguous layout first (einsum's bmm did, on CPU).
    scale = 1.0 / math.sqrt(q.shape[-1])
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, Dh]
    scores = (q @ k.transpose(-2, -1)).float() * scale  # [B, H, T, T]
    probs = scores.softmax(dim=-1).to(v.dtype)
    return (probs @ v).transpose(1, 2)  # [B, T, H, Dh]


BACKENDS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "flash_attn": _flash_attn,
    "xformers": _xformers,
    "sdpa": _sdpa,
    "math": _math,
    # Timed candidates of "auto" on CUDA, not names a config can ask for.
    "sdpa_flash": _sdpa_pinned("FLASH_ATTENTION"),
    "sdpa_cudnn": _sdpa_pinned("CUDNN_ATTENTION"),
    "sdpa_efficient": _sdpa_pinned("EFFICIENT_ATTENTION"),
    "sdpa_math": _sdpa_pinned("MATH"),  # a timed candidate on CPU
}
SDPA_PINNED = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient")
# What "auto" times on CPU: SDPA as dispatched (its CPU flash kernel), SDPA's math kernel
# and the plain math path.
CPU_CANDIDATES = ("sdpa", "sdpa_math", "math")


class ShapeKey(NamedTuple):
    """What one "auto" decision is cached under."""

    batch: int
    tokens: int
    heads: int
    head_dim: int
    dtype: str
    device: str
    with_backward: bool


@dataclass(frozen=True)
class Choice:
    """One measured decision: the backend and every candidate's time in ms (inf: failed)."""

    key: ShapeKey
    backend: str
    timings_ms: dict[str, float]


def cuda_timer(fn: Callable[[], object], warmup: int = 2, reps: int = 5) -> float:
    """Median milliseconds of fn() on the current CUDA stream (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def wall_timer(fn: Callable[[], object], warmup: int = 1, reps: int = 3) -> float:
    """Median wall-clock milliseconds of fn() (CPU: every op has finished on return)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[len(times) // 2]


def _default_timer(fn: Callable[[], object], device_type: str) -> float:
    return cuda_timer(fn) if device_type == "cuda" else wall_timer(fn)


class BackendChooser:
    """Picks the fastest candidate per shape by timing each once on fresh tensors of that
    shape; `timer(fn) -> ms` is injectable (tests), the default uses CUDA events on CUDA and
    the wall clock on CPU."""

    def __init__(self, timer: Callable[[Callable[[], object]], float] | None = None) -> None:
        self.timer = timer
        self.choices: dict[ShapeKey, Choice] = {}

    @staticmethod
    def key(q: torch.Tensor) -> ShapeKey:
        B, T, H, Dh = q.shape
        return ShapeKey(B, T, H, Dh, str(q.dtype), str(q.device), q.requires_grad)

    def cached(self, q: torch.Tensor) -> str | None:
        choice = self.choices.get(self.key(q))
        return None if choice is None else choice.backend

    def choose(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               candidates: list[str]) -> str:
        return self.choose_for(self.key(q), q.dtype, q.device, candidates)

    def choose_for(self, key: ShapeKey, dtype: torch.dtype, device: torch.device,
                   candidates: list[str]) -> str:
        """The decision for `key`, timing every candidate the first time it is asked."""
        if key in self.choices:
            return self.choices[key].backend
        timings = {name: self._time(name, key, dtype, device) for name in candidates}
        best = min(candidates, key=lambda name: timings[name])
        if math.isinf(timings[best]):
            raise RuntimeError(f"no attention backend ran at shape {key}: {candidates}")
        self.choices[key] = Choice(key, best, timings)
        log.info("attention auto at %s: %s (ms: %s)", key, best,
                 ", ".join(f"{n}={t:.3f}" for n, t in timings.items()))
        return best

    def _time(self, name: str, key: ShapeKey, dtype: torch.dtype, device: torch.device
              ) -> float:
        """Forward, plus backward when the key says a grad follows, on fresh tensors."""
        fn, grad = BACKENDS[name], key.with_backward
        # A generator of its own: measuring must not move the global RNG (a resumed run
        # measures at another step than the uninterrupted one, and must draw the same).
        gen = torch.Generator(device).manual_seed(0)
        shape = (key.batch, key.tokens, key.heads, key.head_dim)
        q, k, v = (torch.randn(shape, generator=gen, device=device).to(dtype)
                   .requires_grad_(grad) for _ in range(3))

        def step() -> None:
            with torch.enable_grad():
                out = fn(q, k, v)
                if grad:
                    out.backward(torch.ones_like(out))

        try:
            if self.timer is not None:
                return float(self.timer(step))
            return float(_default_timer(step, device.type))
        except RuntimeError as exc:  # this kernel does not support the shape/dtype/device
            log.info("attention auto: %s unavailable at %s: %s", name, key, exc)
            return math.inf


_CHOOSER = BackendChooser()


def attention_choices() -> list[Choice]:
    """Every measured "auto" decision of this process, with the candidates' timings."""
    return list(_CHOOSER.choices.values())


def auto_candidates(q: torch.Tensor, available: tuple[str, ...], cuda: bool | None = None
                    ) -> list[str]:
    """What "auto" times for q (on q's device unless `cuda` says). CUDA: the importable
    backends that support q, with SDPA split into its pinned kernels (math is never the
    fastest there and is left out). CPU: SDPA as dispatched, SDPA's math kernel and the
    plain math path."""
    if not (q.is_cuda if cuda is None else cuda):
        return [name for name in CPU_CANDIDATES if name in BACKENDS
                and (name == "sdpa_math" or name in available)]
    names = []
    for name in available:
        if name == "sdpa":
            names += list(SDPA_PINNED)
        elif name != "math" and supports(name, q):
            names.append(name)
    return names


def _can_time(q: torch.Tensor) -> bool:
    """Eager calls on CUDA (outside a graph capture) and on CPU."""
    if torch.compiler.is_compiling():
        return False
    return not q.is_cuda or not torch.cuda.is_current_stream_capturing()


@torch._dynamo.assume_constant_result
def _traced_cpu_choice(batch: int, tokens: int, heads: int, head_dim: int,
                       dtype: torch.dtype, with_backward: bool,
                       available: tuple[str, ...]) -> str:
    """The CPU decision for a shape met while torch.compile traces: dynamo runs this for
    real, once, with the traced shape's numbers, and bakes the answer into the graph as a
    constant, so the compiled step gets a measured backend without a graph break."""
    key = ShapeKey(batch, tokens, heads, head_dim, str(dtype), "cpu", with_backward)
    probe = torch.empty(0, dtype=dtype)
    candidates = auto_candidates(probe, available)
    return _CHOOSER.choose_for(key, dtype, torch.device("cpu"), candidates)


def choose_auto(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                available: tuple[str, ...], chooser: BackendChooser | None = None,
                can_time: bool | None = None) -> str:
    """The backend "auto" runs q on: measured once per shape where timing can run (and on
    CPU under torch.compile, at trace time), the cached measurement elsewhere, else the
    static preference order."""
    if chooser is None and not q.is_cuda and torch.compiler.is_compiling():
        return _traced_cpu_choice(*q.shape, q.dtype, q.requires_grad, available)
    chooser = chooser or _CHOOSER
    cached = chooser.cached(q)
    if cached is not None:
        return cached
    if can_time if can_time is not None else _can_time(q):
        return chooser.choose(q, k, v, auto_candidates(q, available))
    return resolve_backend("auto", q, available)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto",
              available: tuple[str, ...] | None = None) -> tuple[torch.Tensor, str]:
    """q, k, v: [B, T, H, Dh] -> ([B, T, H, Dh], the backend used)."""
    if backend == "auto":
        chosen = choose_auto(q, k, v, available or _importable_backends())
    else:
        chosen = resolve_backend(backend, q, available)
    if torch.compiler.is_compiling():
        return BACKENDS[chosen](q, k, v), chosen
    _log_choice(chosen, q.device.type, q.dtype)  # once per choice, outside traced code
    # A named range, so profiles count the plain math path (matmuls and a softmax) as
    # attention too, not as GEMMs and elementwise work.
    with record_function(f"attention:{chosen}"):
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
