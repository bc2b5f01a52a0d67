"""How a run executes: intra-op threads, precision and compilation, decided by measurement
where the config says "auto".

    threads    CPU: the current count, or fewer where a matmul at the model's width
               measures faster with fewer (a core another process keeps busy)
    precision  CUDA: bf16 autocast. CPU: bf16 autocast where a bf16 matmul at the model's
               width runs at least BF16_MIN_SPEEDUP times faster than fp32 (CPUs with
               bf16 matrix units: AMX, AVX512-BF16), else fp32 (CPUs that emulate bf16)
    compile    CUDA: off unless asked. CPU: on when the run is long enough to repay the
               compilation (COMPILE_MIN_STEPS)

Only the network's matmuls and activations drop to bf16 under autocast: parameters,
optimizer state, the EMAs, EDM preconditioning, the loss reductions and the sampler's ODE
state stay fp32 (the model casts those explicitly). Every decision carries the timings it
was made on, for the run's log and `metrics.jsonl`.

`AcceleratedDenoiser` applies the same choices to sampling: the sampler's network call
under autocast and, where asked, compiled; the ODE state stays float64.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from train.config import compile_mode

# bf16 must buy at least this much matmul speed over fp32 to be chosen. CPUs fall into two
# clear groups: with bf16 matrix units 2.2-2.6x (AMD EPYC, AVX512-BF16, measured here) to
# 7-8x (Intel AMX); without them bf16 is emulated and slower than fp32 (under 1x). The
# threshold sits between the groups, far enough from both that a busy machine's timing
# noise (seen here: a 2.4x CPU measured 1.48x once under load, with medians) cannot move
# a CPU across it.
BF16_MIN_SPEEDUP = 1.25
# A cold CPU compile of a tiny preset's step takes 40-70 s and saves about 40% of a
# 0.2-0.5 s step, so it is repaid after a few hundred steps; a warm inductor cache
# (build/inductor-cache) repays it sooner.
COMPILE_MIN_STEPS = 400
# Sampling compiles the network's forward alone (quicker); repaid from a few hundred
# samples of 2N-1 evaluations each.
COMPILE_MIN_SAMPLES = 256


def inductor_options(device: torch.device) -> dict[str, Any] | None:
    """Inductor settings for `torch.compile(options=...)`, local to the compiled function.
    CPU: tanh through exp (the GELU of every MLP; its vectorised tanh measured about 2x
    slower here)."""
    if device.type == "cpu":
        return {"cpp.use_decompose_tanh": True}
    return None


# ----------------------------------------------------------------------------- matmuls


@dataclass(frozen=True)
class MatmulTimings:
    """Best-of-reps milliseconds of one [rows, width] @ [width, 4 width] matmul per dtype."""

    shape: tuple[int, int, int]
    threads: int
    fp32_ms: float
    bf16_ms: float | None  # None: bf16 matmul failed on this device

    @property
    def bf16_speedup(self) -> float:
        return self.fp32_ms / self.bf16_ms if self.bf16_ms else 0.0


def _best_ms(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """The fastest of `reps` timed calls of each function, the functions interleaved: other
    work on the machine only ever slows a call down, so the minimum is the estimate least
    moved by it, and interleaving exposes every function to the same load."""
    for fn in fns.values():
        fn()  # warm-up: first-call allocation and kernel selection
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], 1e3 * (time.perf_counter() - start))
    return best


def time_matmuls(width: int, device: torch.device, rows: int = 4096, reps: int = 7
                 ) -> MatmulTimings:
    """The MLP's first matmul at the model's width, in fp32 and bf16 (a few ms on CPU)."""
    shape = (rows, width, 4 * width)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, width, generator=g).to(device)
    b = torch.randn(width, 4 * width, generator=g).to(device)
    fns: dict[str, Callable[[], object]] = {"fp32": lambda: a @ b}
    try:
        a16, b16 = a.bfloat16(), b.bfloat16()
        (a16 @ b16).sum()
        fns["bf16"] = lambda: a16 @ b16
    except RuntimeError:  # no bf16 matmul on this device
        pass
    best = _best_ms(fns, reps)
    return MatmulTimings(shape, torch.get_num_threads(), best["fp32"], best.get("bf16"))


# ----------------------------------------------------------------------------- threads


@dataclass(frozen=True)
class ThreadsChoice:
    threads: int
    reason: str
    timings_ms: dict[int, float]  # threads -> best ms of the probe matmul

    def record(self) -> dict[str, Any]:
        return {"threads": self.threads, "reason": self.reason,
                "timings_ms": {str(k): v for k, v in self.timings_ms.items()}}


def choose_threads(requested: int, width: int, device: torch.device,
                   measure: Callable[[int], float] | None = None) -> ThreadsChoice:
    """`requested` > 0 forces it. 0 (auto): on CPU, the current count unless fewer threads
    run the probe matmul faster; never more than the current count, so a process that
    was limited (OMP_NUM_THREADS, a test harness) stays limited."""
    current = torch.get_num_threads()
    if requested > 0:
        return ThreadsChoice(requested, "forced (run.threads)", {})
    if device.type != "cpu" or current <= 1:
        return ThreadsChoice(current, "default", {})
    if measure is None:
        def measure(n: int) -> float:
            torch.set_num_threads(n)
            try:
                return time_matmuls(width, device, reps=3).fp32_ms
            finally:
                torch.set_num_threads(current)

    counts = sorted({current, max(1, current // 2), 1}, reverse=True)
    timings = {n: measure(n) for n in counts}
    # Fewer threads only for a clear gain (>10%): timing noise must not give up cores.
    best = min(counts, key=lambda n: timings[n] * (1.0 if n == current else 1.1))
    reason = (f"{best} measured faster than the default {current}" if best != current
              else "the default, measured fastest")
    return ThreadsChoice(best, reason, timings)


def apply_threads(choice: ThreadsChoice) -> None:
    if choice.threads != torch.get_num_threads():
        torch.set_num_threads(choice.threads)


# ----------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class PrecisionChoice:
    name: str  # "bf16" | "fp32"
    reason: str
    timings: MatmulTimings | None = None

    def autocast(self, device: torch.device, cache_enabled: bool = True
                 ) -> contextlib.AbstractContextManager:
        """bf16 autocast on the device, or nothing (fp32)."""
        if self.name == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)
        return contextlib.nullcontext()

    def record(self) -> dict[str, Any]:
        timings = None
        if self.timings is not None:
            timings = {**asdict(self.timings), "bf16_speedup": self.timings.bf16_speedup}
        return {"precision": self.name, "reason": self.reason, "matmul": timings}


def choose_precision(requested: str, device: torch.device, width: int,
                     measure: Callable[[int, torch.device], MatmulTimings] | None = None
                     ) -> PrecisionChoice:
    """"fp32" or "bf16" force it; "auto" is bf16 on CUDA, and on CPU bf16 only where a
    matmul at the model's width measures at least BF16_MIN_SPEEDUP faster than fp32."""
    if requested not in ("auto", "bf16", "fp32"):
        raise ValueError(f"run.precision must be 'auto', 'bf16' or 'fp32', got {requested!r}")
    if requested != "auto":
        return PrecisionChoice(requested, "forced (run.precision)")
    if device.type == "cuda":
        return PrecisionChoice("bf16", "CUDA: bf16 autocast")
    timings = (measure or time_matmuls)(width, device)
    speedup = timings.bf16_speedup
    if speedup >= BF16_MIN_SPEEDUP:
        reason = f"bf16 matmul {speedup:.2f}x faster than fp32 at width {width}"
        return PrecisionChoice("bf16", reason, timings)
    reason = (f"bf16 matmul only {speedup:.2f}x fp32 at width {width} (needs "
              f"{BF16_MIN_SPEEDUP}x): no fast bf16 matrix units")
    return PrecisionChoice("fp32", reason, timings)


# ----------------------------------------------------------------------------- compile


@dataclass(frozen=True)
class CompileChoice:
    on: bool
    reason: str

    def record(self) -> dict[str, Any]:
        return {"compile": self.on, "reason": self.reason}


def choose_compile(requested: Any, device: torch.device, planned_steps: int,
                   min_steps: int = COMPILE_MIN_STEPS) -> CompileChoice:
    """"on"/"off" force it; "auto" compiles on CPU when this invocation plans at least
    `min_steps` steps (or samples), and leaves CUDA runs eager (their default is
    unchanged)."""
    mode = compile_mode(requested)
    if mode != "auto":
        return CompileChoice(mode == "on", f"forced (run.compile = {mode!r})")
    if device.type != "cpu":
        return CompileChoice(False, f"{device.type}: eager unless run.compile = 'on'")
    if planned_steps >= min_steps:
        return CompileChoice(True, f"CPU, {planned_steps} steps planned (>= {min_steps}): "
                                   "repays the compilation")
    return CompileChoice(False, f"CPU, {planned_steps} steps planned (< {min_steps}): too "
                                "short to repay the compilation")


@dataclass(frozen=True)
class ExecutionPlan:
    """The three decisions of a run, made once at set-up, in this order (precision and
    compile are measured at the chosen thread count)."""

    threads: ThreadsChoice
    precision: PrecisionChoice
    compile: CompileChoice

    def record(self) -> dict[str, Any]:
        return {"threads": self.threads.record(), "precision": self.precision.record(),
                "compile": self.compile.record()}

    def summary(self) -> str:
        mode = "compiled" if self.compile.on else "eager"
        n = self.threads.threads
        return (f"{self.precision.name} ({self.precision.reason}); {mode} "
                f"({self.compile.reason}); {n} thread{'s' if n != 1 else ''} "
                f"({self.threads.reason})")


def plan_execution(threads: int, precision: str, compile: Any, device: torch.device,
                   width: int, planned_steps: int) -> ExecutionPlan:
    """Decides (and applies the thread count) for a run of `planned_steps` steps of a
    model `width` wide, from run.threads, run.precision and run.compile."""
    thread_choice = choose_threads(threads, width, device)
    apply_threads(thread_choice)
    return ExecutionPlan(thread_choice, choose_precision(precision, device, width),
                         choose_compile(compile, device, planned_steps))


def default_inductor_cache(project_root: str) -> str | None:
    """Points Inductor's cache at `project_root`/build/inductor-cache unless the user chose
    one, so a second run reuses compiled kernels; returns the folder used (None: the
    user's)."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return None
    folder = os.path.join(project_root, "build", "inductor-cache")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


# ----------------------------------------------------------------------------- sampling


class AcceleratedDenoiser(nn.Module):
    """A sampling view of a net: `denoise` runs under the chosen autocast and, when asked,
    compiled. Compiled, it keeps one graph: the per-step sigma is a tensor input, and a
    batch smaller than the first one is padded up to it (rows never interact in the
    network) and cut back, so a last partial batch costs no second compilation. It exposes
    what the sampler reads (`config`, parameters), so `model.edm_sample` takes it in place
    of the net; the ODE state stays float64."""

    def __init__(self, net: nn.Module, precision: PrecisionChoice, compiled: bool) -> None:
        super().__init__()
        self.net = net
        self.config = net.config
        self.precision = precision
        self.compiled = compiled
        self.device = next(net.parameters()).device
        self._call = self._denoise
        self._batch: int | None = None  # the compiled graph's batch
        if compiled:
            self._call = torch.compile(self._denoise, dynamic=False,
                                       options=inductor_options(self.device))

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor,
                 cfg_scale: float) -> torch.Tensor:
        with self.precision.autocast(self.device):
            return self.net.denoise(x, sigma, y, cfg_scale)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, y: torch.Tensor,
                cfg_scale: float = 1.0) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        rows = x.shape[0]
        if not self.compiled or self._batch is None or rows >= self._batch:
            self._batch = self._batch or rows
            return self._call(x, sigma, y, cfg_scale)
        pad = self._batch - rows
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])  # [batch, C, H, W]
        y = torch.cat([y, y.new_zeros(pad)])
        return self._call(x, sigma, y, cfg_scale)[:rows]

    def describe(self) -> dict[str, Any]:
        return {**self.precision.record(), "compiled": self.compiled}


def accelerated_denoiser(net: nn.Module, precision: str = "auto", compile: Any = "auto",
                         num_samples: int = 0) -> AcceleratedDenoiser:
    """The sampling view of `net` for `num_samples` samples: precision decided as for
    training (measured on CPU), compiled on CPU from COMPILE_MIN_SAMPLES samples."""
    device = next(net.parameters()).device
    choice = choose_precision(precision, device, int(net.config.hidden_size))
    compiled = choose_compile(compile, device, num_samples, COMPILE_MIN_SAMPLES).on
    return AcceleratedDenoiser(net, choice, compiled)


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """--precision and --compile for the commands that sample (`sddit sample`, `eval`)."""
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                        help="network precision while sampling (auto: bf16 on CUDA, and on "
                             "CPUs whose bf16 matmul measures >= 1.25x fp32; the ODE state "
                             "stays float64)")
    parser.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                        help=f"torch.compile the network's forward (auto: on CPU from "
                             f"{COMPILE_MIN_SAMPLES} samples)")
