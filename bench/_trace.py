"""Reading a torch.profiler run: time per phase, per kind of work, and the top kernels.

Every profiled op's time is counted once:
- on CUDA, the device time of each kernel, attributed to the CPU op that launched it;
- on CPU, each op's *self* CPU time (its total minus its children's), so nested ops are
  not counted twice.

Its **phase** is the innermost enclosing `phase:<name>` range (the training step's
`record_function` ranges, plus those `bench.profile` attaches to the model's submodules).
Its **kind** is one of attention, gemm, fused, optimizer, ema, other:
- optimizer / ema: anything inside the optimizer, teacher-EMA or sampling-EMA phase;
- attention: SDPA / flash / memory-efficient / cuDNN attention ops and kernels;
- gemm: matmuls, linear layers, convolutions, cuBLAS/CUTLASS kernels;
- fused: this project's Triton kernels (sdkernels), Inductor-generated kernels
  (`triton_*` on CUDA; on CPU the self time of Inductor's compiled graphs, whose fused C++
  loops record no op events of their own);
- other: the rest (elementwise ops, norms, copies, host overhead inside ranges).
"""

from __future__ import annotations

import bisect
import importlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

PHASE_PREFIX = "phase:"
KINDS = ("attention", "gemm", "fused", "optimizer", "ema", "other")

_ATTENTION = re.compile(r"attention|flash|fmha|sdpa|_efficient_attention|cudnn.*mha", re.I)
_GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
             "aten::linear", "aten::_addmm_activation", "aten::convolution",
             "aten::_convolution", "aten::conv2d", "aten::mkldnn_convolution",
             "aten::_scaled_mm"}
_GEMM_KERNELS = re.compile(r"gemm|cutlass|xmma|nvjet|cublas|sm\d+_.*(mma|gmma)|wgmma|"
                           r"implicit_convolve|conv2d", re.I)
_FUSED_KERNELS = re.compile(r"^triton_|^cpp_fused|sdkernels", re.I)
# On CPU, Inductor's generated C++ runs inside this range without op events of its own.
_INDUCTOR_GRAPH = re.compile(r"^## Call CompiledFxGraph")
_SDKERNEL_MODULES = ("sdkernels.adaln", "sdkernels.tokens", "sdkernels.edm")


def sdkernel_names() -> frozenset[str]:
    """Names of this project's @triton.jit kernels: CUDA traces name kernels after them."""
    names: set[str] = set()
    for module_name in _SDKERNEL_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, value in vars(module).items():
            if hasattr(value, "arg_names") and hasattr(value, "fn"):  # a JITFunction
                names.add(name)
    return frozenset(names)


def classify(name: str, ancestors: list[str], phase: str | None,
             own_kernels: frozenset[str]) -> str:
    """The kind of work of one op or kernel `name` under its op `ancestors` (innermost
    first) in `phase`."""
    if phase in ("optimizer",):
        return "optimizer"
    if phase in ("teacher_ema", "sampling_ema"):
        return "ema"
    chain = [name, *ancestors]
    if any(_ATTENTION.search(n) for n in chain):
        return "attention"
    if any(n in _GEMM_OPS for n in chain) or _GEMM_KERNELS.search(name):
        return "gemm"
    if (name in own_kernels or _INDUCTOR_GRAPH.search(name)
            or any(_FUSED_KERNELS.search(n) for n in chain)):
        return "fused"
    return "other"


@dataclass
class Breakdown:
    """Microseconds per phase, per kind and per kernel (or op, on CPU), over the profiled
    steps; `steps` divides them into per-step figures."""

    steps: int
    device: str
    by_phase: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    by_kind: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    by_kernel: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    kernel_calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def total_us(self) -> float:
        return sum(self.by_kind.values())

    def shares(self) -> dict[str, float]:
        total = self.total_us or 1.0
        return {k: self.by_kind.get(k, 0.0) / total for k in KINDS}

    def phase_table(self) -> list[dict[str, Any]]:
        total = self.total_us or 1.0
        rows = sorted(self.by_phase.items(), key=lambda kv: -kv[1])
        return [{"phase": p, "ms_per_step": us / 1e3 / self.steps, "pct": 100 * us / total}
                for p, us in rows]

    def top_kernels(self, n: int = 15) -> list[dict[str, Any]]:
        total = self.total_us or 1.0
        rows = sorted(self.by_kernel.items(), key=lambda kv: -kv[1])[:n]
        return [{"name": k, "ms_per_step": us / 1e3 / self.steps, "pct": 100 * us / total,
                 "calls_per_step": self.kernel_calls[k] / self.steps} for k, us in rows]

    def to_dict(self, top: int = 15) -> dict[str, Any]:
        return {"steps": self.steps, "device": self.device, "time_unit": "ms per step",
                "total_ms_per_step": self.total_us / 1e3 / self.steps,
                "shares": self.shares(), "phases": self.phase_table(),
                "top_kernels": self.top_kernels(top)}


def _lineage(event: Any) -> tuple[list[str], str | None]:
    """(op names above `event`, innermost first; its innermost phase or None)."""
    names, phase = [], None
    if event.name.startswith(PHASE_PREFIX):
        phase = event.name[len(PHASE_PREFIX):]
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(PHASE_PREFIX):
            phase = phase or parent.name[len(PHASE_PREFIX):]
        else:
            names.append(parent.name)
        parent = parent.cpu_parent
    return names, phase


class PhaseTimeline:
    """The `phase:` ranges by time, to place ops run on another thread (CUDA's backward
    runs on the autograd engine's device thread, outside the caller's ranges) in the phase
    the caller was in meanwhile."""

    def __init__(self, events: list[Any]) -> None:
        spans = sorted((e.time_range.start, e.time_range.end, e.name[len(PHASE_PREFIX):])
                       for e in events if e.name.startswith(PHASE_PREFIX))
        self.starts = [s[0] for s in spans]
        self.spans = spans

    def at(self, t: float) -> str | None:
        """The innermost range open at time t (ranges nest, so walk back to the first
        one that is still open)."""
        i = bisect.bisect_right(self.starts, t) - 1
        while i >= 0:
            start, end, name = self.spans[i]
            if end >= t:
                return name
            i -= 1
        return None


def _add(bd: Breakdown, name: str, us: float, ancestors: list[str], phase: str | None,
         own: frozenset[str]) -> None:
    kind = classify(name, ancestors, phase, own)
    bd.by_kind[kind] += us
    bd.by_phase[phase or "outside phases"] += us
    bd.by_kernel[name] += us
    bd.kernel_calls[name] += 1


def breakdown(events: list[Any], steps: int, cuda: bool) -> Breakdown:
    """Builds the Breakdown from `profiler.events()` (FunctionEvents) of `steps` steps."""
    own = sdkernel_names()
    bd = Breakdown(steps=steps, device="cuda" if cuda else "cpu")
    events = [e for e in events
              if not getattr(e, "is_async", False) and str(e.device_type) == "DeviceType.CPU"]
    timeline = PhaseTimeline(events)
    for event in events:
        if cuda:
            if not event.kernels:
                continue
            ancestors, phase = _lineage(event)
            phase = phase or timeline.at(event.time_range.start)
            ancestors = [event.name, *ancestors]
            for kernel in event.kernels:
                _add(bd, kernel.name, float(kernel.duration), ancestors, phase, own)
        else:
            us = float(event.self_cpu_time_total)
            if us <= 0 or event.name.startswith("ProfilerStep"):
                continue
            ancestors, phase = _lineage(event)
            phase = phase or timeline.at(event.time_range.start)
            if event.name.startswith(PHASE_PREFIX):  # host time in a range, between its ops
                _add(bd, f"(host, {event.name})", us, ancestors, phase, own)
            else:
                _add(bd, event.name, us, ancestors, phase, own)
    return bd
