"""AdamW, SD-DiT's teacher momentum update and the sampling EMA in one multi-tensor pass.

Math, per element of each parameter p with gradient g (decoupled weight decay and bias
correction exactly as `torch.optim.AdamW`; lerp as `torch.lerp`), at Adam step s (1-based,
counted per tensor):

    p   <- p * (1 - lr * wd)
    m   <- lerp(m, g, 1 - beta1)
    v   <- v * beta2 + (1 - beta2) * g * g
    p   <- p - lr / (1 - beta1^s) * m / (sqrt(v) / sqrt(1 - beta2^s) + eps)
    t   <- lerp(t, p, 1 - momentum)         the teacher tensor paired with p, if any
    e   <- lerp(e, p, 1 - ema_beta)         the sampling-EMA tensor paired with p, if any
    t16 <- bf16(t)                          an optional bf16 shadow of the teacher
    lerp(a, b, w) = a + w * (b - a) if |w| < 0.5 else b - (b - a) * (1 - w)

A nonzero `found_inf` (a device scalar) skips everything, steps included, with no host
sync. A parameter without a gradient this step skips the Adam part (as torch does) and
still updates its teacher and EMA from its unchanged value.

Layout: every tensor is fp32 and contiguous (the bf16 shadow aside). A `MultiTensorTable`
built once holds, per tensor, the addresses of its param, grad, exp_avg, exp_avg_sq,
teacher, EMA and shadow (0 where absent) and its element count, plus a chunk table
(tensor index, first element) that gives each program one chunk of one tensor, as apex's
multi_tensor_apply does. Tensors are grouped by which of the parts they have, one launch
per group with those parts as constexpr flags (typically 2-3 launches for a whole net).
Grad addresses change when autograd allocates new grads, so they sit in a separate table
refreshed per step: a host-side comparison, and one small non-blocking upload from pinned
memory per group whose grads moved (never a host sync). Under CUDA-graph capture keep the
grads at fixed addresses (`zero_grad(set_to_none=False)` before capturing), so that
nothing is uploaded inside the captured region.

Design:
- One read and one write of each state per element: p, m, v, t, e read and written once,
  g read once, the shadow written once. At SD-DiT-XL/2 that is 46 bytes per parameter
  against about 66 for fused AdamW + foreach teacher mul/add + foreach EMA lerp + the
  per-forward bf16 cast of the teacher (see bench/cases/optim.py).
- Bias corrections are computed per program in fp64 from the per-tensor step count on the
  device (so a skipped step needs no host round trip), then rounded to fp32 like the
  Python-float scalars torch passes to its fp32 kernels. Square root and division are
  IEEE round-to-nearest (`sqrt_rn`, `div_rn`), as torch's CPU and CUDA kernels compute;
  lerp is an fma as in torch's vectorised CPU kernel. Agreement with torch.optim.AdamW is
  to a few ulps, not bitwise: torch's own fused and single-tensor AdamW differ by about
  an ulp, and the interpreter's fma is unfused. The torch fallback is torch, bitwise.
- Element-wise only: bitwise deterministic.
Limits: fp32 parameters and states (AMP-style master weights); one table per set of
tensors (rebuild it after replacing any tensor, e.g. loading optimizer state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from sdkernels import _runtime

ROLES = ("param", "grad", "exp_avg", "exp_avg_sq", "teacher", "ema", "shadow")
_GPU_CHUNK, _GPU_BLOCK = 8192, 1024  # elements per program, per inner iteration
_INTERP_CHUNK = 1 << 16  # ~1 ms per program under the interpreter: few, large chunks


@dataclass(frozen=True)
class StepScalars:
    """The hyper-parameters of one step, as Python floats."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    teacher_momentum: float = 1.0
    ema_beta: float = 1.0


# ----------------------------------------------------------------------------- reference
@torch.no_grad()
def adamw_ema_ref(tensors: list[dict[str, torch.Tensor | None]], steps: torch.Tensor,
                  s: StepScalars, found_inf: torch.Tensor | None = None) -> None:
    """The spec, in place: torch's single-tensor AdamW, then torch.lerp for the teacher,
    the EMA and the shadow copy. `tensors[i]` maps ROLES to tensors (None: absent);
    `steps[i]` counts tensor i's Adam steps and is incremented here. With `found_inf`
    the update is computed aside and committed only where found_inf == 0 (no host sync)."""
    skip = None if found_inf is None else found_inf.reshape(()) != 0
    for i, t in enumerate(tensors):
        p, g = t["param"], t["grad"]
        new_p = p.clone()
        if g is not None:
            step = float(steps[i]) + 1.0  # CPU reference: reading the step is free
            m, v = t["exp_avg"].clone(), t["exp_avg_sq"].clone()
            if s.weight_decay != 0:
                new_p.mul_(1 - s.lr * s.weight_decay)
            m.lerp_(g, 1 - s.beta1)
            v.mul_(s.beta2).addcmul_(g, g, value=1 - s.beta2)
            step_size = s.lr / (1 - s.beta1**step)
            denom = (v.sqrt() / (1 - s.beta2**step) ** 0.5).add_(s.eps)
            new_p.addcdiv_(m, denom, value=-step_size)
            _commit(t["exp_avg"], m, skip)
            _commit(t["exp_avg_sq"], v, skip)
            _commit(steps[i:i + 1], steps[i:i + 1] + 1, skip)
        _commit(p, new_p, skip)
        for role, weight in (("teacher", 1 - s.teacher_momentum), ("ema", 1 - s.ema_beta)):
            if t[role] is not None:
                _commit(t[role], torch.lerp(t[role], new_p, weight), skip)
        if t["shadow"] is not None:
            t["shadow"].copy_(t["teacher"])


def _commit(dst: torch.Tensor, new: torch.Tensor, skip: torch.Tensor | None) -> None:
    dst.copy_(new if skip is None else torch.where(skip, dst, new))


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _lerp(a, b, w):
    """torch.lerp(a, b, w) for a scalar weight w, with torch's two branches and its
    vectorised form fma(w, b - a, a) or fma(w - 1, b - a, b). (The interpreter's fma is
    unfused: there results may differ from torch's by an ulp.)"""
    small = w < 0.5
    return tl.fma(tl.where(small, w, w - 1.0), b - a, tl.where(small, a, b))


@triton.jit
def _adamw_ema_kernel(
    ADDR,  # *i64 [n_tensors, 7] addresses of param, exp_avg, exp_avg_sq, teacher, ema,
    #        shadow (fp32 but the bf16 shadow; 0 where absent), then the tensor's row in
    #        STEPS (a group holds a subset of the tensors)
    GRADS,  # *i64 [n_tensors] grad addresses (read only if ADAM): refreshed per step
    NUMEL,  # *i64 [n_tensors] elements per tensor
    CHUNKS,  # *i32 [n_chunks, 2] (tensor index, first element) of each program's chunk
    STEPS,  # *fp32 [all tensors] Adam steps each tensor took before this one (read only)
    FOUND_INF,  # *fp32 [1] nonzero skips every store (read only if HAS_FOUND_INF)
    lr, log_beta1, log_beta2,  # fp64: for the per-tensor bias corrections
    decay, beta2, eps, w_m, w_v, w_teacher, w_ema,  # fp32: 1 - lr*wd, ..., lerp weights
    ADAM: tl.constexpr, TEACHER: tl.constexpr, EMA: tl.constexpr, SHADOW: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    chunk = tl.program_id(0)  # grid: (n_chunks,)
    tensor = tl.load(CHUNKS + 2 * chunk).to(tl.int64)
    start = tl.load(CHUNKS + 2 * chunk + 1).to(tl.int64)
    numel = tl.load(NUMEL + tensor)
    row = ADDR + 7 * tensor
    p_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
    if HAS_FOUND_INF:  # a skipped step masks every element: nothing is read or written
        numel = tl.where(tl.load(FOUND_INF) == 0.0, numel, 0)
    if ADAM:
        g_ptr = tl.load(GRADS + tensor).to(tl.pointer_type(tl.float32))
        m_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        step = tl.load(STEPS + tl.load(row + 6)).to(tl.float64) + 1.0
        step_size = (lr / (1.0 - tl.exp(step * log_beta1))).to(tl.float32)
        bc2_sqrt = tl.sqrt(1.0 - tl.exp(step * log_beta2)).to(tl.float32)
    if TEACHER:
        t_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    if EMA:
        e_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    if SHADOW:
        s_ptr = tl.load(row + 5).to(tl.pointer_type(tl.bfloat16))
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < numel
        p = tl.load(p_ptr + idx, mask=mask)
        if ADAM:
            g = tl.load(g_ptr + idx, mask=mask)
            m = _lerp(tl.load(m_ptr + idx, mask=mask), g, w_m)
            v = tl.load(v_ptr + idx, mask=mask) * beta2 + w_v * g * g
            denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
            p = p * decay + tl.div_rn(-step_size * m, denom)
            tl.store(m_ptr + idx, m, mask=mask)
            tl.store(v_ptr + idx, v, mask=mask)
            tl.store(p_ptr + idx, p, mask=mask)
        if TEACHER:
            t = _lerp(tl.load(t_ptr + idx, mask=mask), p, w_teacher)
            tl.store(t_ptr + idx, t, mask=mask)
            if SHADOW:
                tl.store(s_ptr + idx, t.to(tl.bfloat16), mask=mask)
        if EMA:
            e = _lerp(tl.load(e_ptr + idx, mask=mask), p, w_ema)
            tl.store(e_ptr + idx, e, mask=mask)


# ----------------------------------------------------------------------------- tables
_ADDR_ROLES = ("param", "exp_avg", "exp_avg_sq", "teacher", "ema", "shadow")  # + steps row
Flags = tuple[bool, bool, bool, bool]  # ADAM (has a grad), TEACHER, EMA, SHADOW


@dataclass
class _Group:
    """Tensors sharing one kernel variant: which parts they have, and their tables."""

    flags: Flags
    index: list[int]  # positions in the table's tensor list
    addr: torch.Tensor  # [n, 7] int64, device: _ADDR_ROLES addresses, then the steps row
    grads: torch.Tensor  # [n] int64, device: grad addresses
    numel: torch.Tensor  # [n] int64, device
    chunks: torch.Tensor  # [n_chunks, 2] int32, device
    grad_ptrs: tuple[int, ...] = ()  # what `grads` holds, to skip unchanged uploads


@dataclass
class MultiTensorTable:
    """Address and chunk tables for a fixed list of tensor sets (see module docstring)."""

    tensors: list[dict[str, torch.Tensor | None]]
    chunk: int
    groups: list[_Group] = field(default_factory=list)
    pattern: tuple[bool, ...] = ()  # which tensors had a grad when the groups were built
    adam_rows: torch.Tensor | None = None  # [n_adam] int64: rows of `steps` Adam advances
    adam_ones: torch.Tensor | None = None  # [n_adam] fp32 ones


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _to_device(values: list | torch.Tensor, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """A host list or CPU tensor on `device`. On CUDA through pinned memory and
    non-blocking, so that refreshing a table never synchronises the host with the GPU."""
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values,
                                                                                 dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _check_tensor_set(i: int, t: dict[str, torch.Tensor | None]) -> None:
    p = t["param"]
    for role in ROLES:
        x = t.get(role)
        if x is None:
            continue
        want = torch.bfloat16 if role == "shadow" else torch.float32
        if x.dtype != want or not x.is_contiguous() or x.shape != p.shape or x.device != p.device:
            raise ValueError(f"tensor {i}: {role} must be a contiguous {want} tensor shaped "
                             f"like its param {list(p.shape)} on {p.device}, got {x.dtype} "
                             f"{list(x.shape)} on {x.device} (contiguous={x.is_contiguous()})")
    if t.get("shadow") is not None and t.get("teacher") is None:
        raise ValueError(f"tensor {i}: a shadow needs a teacher to copy")


def build_table(tensors: list[dict[str, torch.Tensor | None]]) -> MultiTensorTable:
    """Group the tensor sets by their parts and build the device tables (once; grads are
    refreshed per step by `refresh_grads`)."""
    if not tensors:
        raise ValueError("build_table needs at least one tensor set")
    for i, t in enumerate(tensors):
        _check_tensor_set(i, t)
    chunk = _INTERP_CHUNK if _runtime.interpreter_active() else _GPU_CHUNK
    table = MultiTensorTable(tensors, chunk)
    refresh_grads(table)
    return table


def _flags(t: dict[str, torch.Tensor | None]) -> Flags:
    return (t["grad"] is not None, t["teacher"] is not None, t["ema"] is not None,
            t["shadow"] is not None)


def _make_group(table: MultiTensorTable, flags: Flags, index: list[int],
                device: torch.device) -> _Group:
    rows = [[_address(table.tensors[i].get(r)) for r in _ADDR_ROLES] + [i] for i in index]
    numel = torch.tensor([table.tensors[i]["param"].numel() for i in index], dtype=torch.int64)
    per_tensor = (numel + table.chunk - 1) // table.chunk  # chunks of each tensor
    owner = torch.repeat_interleave(torch.arange(len(index)), per_tensor)  # [n_chunks]
    first = torch.cumsum(per_tensor, 0) - per_tensor  # each tensor's first chunk
    starts = (torch.arange(len(owner)) - first[owner]) * table.chunk
    chunks = torch.stack([owner, starts], dim=1).to(torch.int32)
    return _Group(flags, index, addr=_to_device(rows, torch.int64, device),
                  grads=torch.zeros(len(index), dtype=torch.int64, device=device),
                  numel=_to_device(numel, torch.int64, device),
                  chunks=_to_device(chunks, torch.int32, device))


def _regroup(table: MultiTensorTable, device: torch.device) -> None:
    """Rebuild the groups (when the set of tensors with a grad changed: rare)."""
    by_flags: dict[Flags, list[int]] = {}
    for i, t in enumerate(table.tensors):
        by_flags.setdefault(_flags(t), []).append(i)
    table.groups = [_make_group(table, f, idx, device) for f, idx in sorted(by_flags.items())
                    if f[0] or f[1] or f[2]]  # a set with nothing to update launches nothing
    rows = [i for g in table.groups if g.flags[0] for i in g.index]
    table.adam_rows = _to_device(rows, torch.int64, device)
    table.adam_ones = torch.ones(len(rows), dtype=torch.float32, device=device)
    table.pattern = tuple(t["grad"] is not None for t in table.tensors)


def refresh_grads(table: MultiTensorTable) -> None:
    """Pick up each tensor set's current grad (the caller stores it under "grad"). Host
    work: one address comparison per tensor; a small non-blocking upload per group whose
    grads moved; the groups themselves are rebuilt only when a grad appears or vanishes."""
    device = table.tensors[0]["param"].device
    if tuple(t["grad"] is not None for t in table.tensors) != table.pattern:
        _regroup(table, device)
    for group in table.groups:
        if not group.flags[0]:
            continue
        ptrs = tuple(table.tensors[i]["grad"].data_ptr() for i in group.index)
        if ptrs == group.grad_ptrs:
            continue
        for i in group.index:
            _check_grad(i, table.tensors[i])
        group.grads.copy_(_to_device(list(ptrs), torch.int64, device), non_blocking=True)
        group.grad_ptrs = ptrs


def _check_grad(i: int, t: dict[str, torch.Tensor | None]) -> None:
    g, p = t["grad"], t["param"]
    if g.dtype != torch.float32 or not g.is_contiguous() or g.shape != p.shape:
        raise ValueError(f"tensor {i}: grad must be a contiguous float32 tensor shaped like "
                         f"its param {list(p.shape)}, got {g.dtype} {list(g.shape)} "
                         f"(contiguous={g.is_contiguous()})")


# ----------------------------------------------------------------------------- launcher
def _scalars(s: StepScalars) -> list[float]:
    """The kernel's scalar arguments, computed in fp64 as torch's Python floats are."""
    return [s.lr, math.log(s.beta1), math.log(s.beta2), 1 - s.lr * s.weight_decay, s.beta2,
            s.eps, 1 - s.beta1, 1 - s.beta2, 1 - s.teacher_momentum, 1 - s.ema_beta]


def adamw_ema_step(table: MultiTensorTable, steps: torch.Tensor, s: StepScalars,
                   found_inf: torch.Tensor | None = None) -> None:
    """One fused step over every tensor set of `table` (Triton), then the step counts of
    the tensors that had a grad advance by one unless found_inf is nonzero."""
    if not 0.0 < s.beta1 < 1.0 or not 0.0 < s.beta2 < 1.0:
        raise ValueError(f"betas must lie in (0, 1), got ({s.beta1}, {s.beta2})")
    interp = _runtime.interpreter_active()
    block = table.chunk if interp else _GPU_BLOCK
    scalars = _scalars(s)
    inf_arg = found_inf if found_inf is not None else steps
    for group in table.groups:
        adam, teacher, ema, shadow = group.flags
        _adamw_ema_kernel[(group.chunks.shape[0],)](
            group.addr, group.grads, group.numel, group.chunks, steps, inf_arg, *scalars,
            ADAM=adam, TEACHER=teacher, EMA=ema, SHADOW=shadow,
            HAS_FOUND_INF=found_inf is not None, CHUNK=table.chunk, BLOCK=block, num_warps=4)
    if table.adam_rows is not None and len(table.adam_rows):
        ones = table.adam_ones
        if found_inf is not None:
            ones = ones * (found_inf.reshape(1) == 0)
        steps.index_add_(0, table.adam_rows, ones)
