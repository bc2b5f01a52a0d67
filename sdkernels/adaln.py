"""Fused adaLN modulation for DiT blocks, forward and backward.

Math, per sample b and token t (x_bt is a row of D features):

    adaln_modulate(x, shift, scale):
        mean = mean(x_bt), rstd = 1 / sqrt(var(x_bt) + eps)        (biased var, fp32)
        y_bt = (x_bt - mean) * rstd * (1 + scale_b) + shift_b

    residual_gate_adaln(x, y, gate, shift, scale) -> (x_out, h):
        x_out = x + gate_b * y_bt
        h = adaln_modulate(x_out, shift, scale)

Backward (xhat = (x - mean) * rstd, dxhat = dy * (1 + scale_b)):
    dx = rstd * (dxhat - mean_D(dxhat) - xhat * mean_D(dxhat * xhat))
    dshift_b = sum_t dy_bt,  dscale_b = sum_t dy_bt * xhat_bt,  dgate_b = sum_t dx_out_bt * y_bt

Shapes: x, y [B, T, D]; shift, scale, gate [B, D].
Dtypes (mixed precision): y, gate, shift and scale share one compute dtype C (fp32, fp16
or bf16); the residual stream x is either C or fp32. x_out takes x's dtype, h (the next
Linear's input) takes C, and every gradient takes its input's dtype. So under bf16
autocast the residual stream stays fp32 while the branch output, the modulation vectors
and h stay bf16, with no cast kernel on either side: the forward of residual_gate_adaln
moves 12 bytes per element (x and x_out 4 each, y and h 2 each). All arithmetic,
statistics and token sums run in fp32, with one rounding on each store.

Limits: the fused path needs 1 <= D <= MAX_FUSED_D (8192) and B <= 65535 (grid axis 1);
wider rows and empty inputs take the reference. Inputs and grads of any stride are
accepted (launchers make them contiguous). Under the Triton interpreter fp32 -> bf16
stores truncate instead of rounding to nearest even as a GPU does.

Design choices:
- One kernel reads each input once and writes each output once. A row of D features
  lives in registers (BLOCK_D = next_pow2(D)), so D is limited to MAX_FUSED_D; wider
  rows fall back to the reference. On a GPU a program holds about 2048 elements (one
  row at D=1152); under the interpreter it holds up to 64 rows, so few programs run.
- Forward saves mean and rstd (fp32, [B*T]) so backward does not recompute them.
- Per-sample token sums (dshift, dscale, dgate) are deterministic and atomic-free: the
  backward grid is (sample, token chunk); each program writes fp32 partials
  [n_vec, B, n_chunks, D] and a second kernel sums the chunks in a fixed order.
- residual_gate_adaln computes LN statistics from x_out rounded to the storage dtype:
  h is exactly adaln_modulate applied to the x_out it returns, as in the unfused block
  (where the next LayerNorm reads the stored residual stream).
- Forward and backward launchers are torch.library custom ops (see `_ops.py`), wrapped
  in an autograd.Function, so torch.compile(fullgraph=True) traces through them; eager
  calls run the launchers directly.
"""


import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from sdkernels import _checks, _runtime
from sdkernels._ops import KernelOp, needs_autograd

MAX_FUSED_D = 8192  # a row must fit in registers
_MAX_GRID_B = 65535  # samples run on grid axis 1
_GPU_TILE = 2048  # elements per program on a GPU: rows = _GPU_TILE // BLOCK_D
_GPU_PROGRAMS_PER_SM = 4  # backward grid target; more chunks mean more partials
_INTERPRET_FWD_ROWS = 64
_INTERPRET_BWD_ROWS = 32  # and two tiles per chunk, so loops and chunking both run


# ----------------------------------------------------------------------------- reference
def adaln_modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                       eps: float = 1e-6) -> torch.Tensor:
    """The spec: LayerNorm without affine in fp32, then per-sample scale and shift; the
    result takes the modulation vectors' (compute) dtype."""
    normed = F.layer_norm(x.float(), (x.shape[-1],), eps=eps)  # [B, T, D] fp32
    y = normed * (1 + scale.float()[:, None]) + shift.float()[:, None]
    return y.to(shift.dtype)


def residual_gate_adaln_ref(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                            shift: torch.Tensor, scale: torch.Tensor,
                            eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The spec: gated residual in fp32 rounded once to x's dtype, then adaLN of it (h in
    the compute dtype of y, gate, shift and scale)."""
    x_out = (x.float() + gate.float()[:, None] * y.float()).to(x.dtype)  # [B, T, D]
    return x_out, adaln_modulate_ref(x_out, shift, scale, eps)


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _normalize(x, mask, D, eps):
    """x: fp32 [BLOCK_M, BLOCK_D] rows, zero where masked -> (xhat, mean, rstd)."""
    mean = tl.sum(x, axis=1) / D
    centered = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(centered * centered, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    return centered * rstd[:, None], mean, rstd


@triton.jit
def _modulate_fwd_kernel(
    X,  # *xdtype [B*T, D] input rows (the residual stream: fp32 or the compute dtype)
    SHIFT,  # *cdtype [B, D] (compute dtype)
    SCALE,  # *cdtype [B, D]
    OUT,  # *cdtype [B*T, D] modulated rows
    MEAN,  # *fp32 [B*T] saved for backward
    RSTD,  # *fp32 [B*T] saved for backward
    T, D, eps,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1)  # grid: (cdiv(T, BLOCK_M), B)
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = t < T
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    rows = b.to(tl.int64) * T + t  # [BLOCK_M]
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    xhat, mean, rstd = _normalize(x, mask, D, eps)
    shift = tl.load(SHIFT + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = xhat * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _residual_fwd_kernel(
    X,  # *xdtype [B*T, D] residual stream in (fp32 or the compute dtype)
    BRANCH,  # *cdtype [B*T, D] branch output y, added with the gate
    GATE,  # *cdtype [B, D]
    SHIFT,  # *cdtype [B, D]
    SCALE,  # *cdtype [B, D]
    X_OUT,  # *xdtype [B*T, D] residual stream out
    H,  # *cdtype [B*T, D] adaLN of X_OUT, the next Linear's input
    MEAN,  # *fp32 [B*T] stats of the rounded X_OUT, saved for backward
    RSTD,  # *fp32 [B*T]
    T, D, eps,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1)  # grid: (cdiv(T, BLOCK_M), B)
    t = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = t < T
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    rows = b.to(tl.int64) * T + t
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    branch = tl.load(BRANCH + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    x_out = (x + gate[None, :] * branch).to(X_OUT.dtype.element_ty)
    tl.store(X_OUT + offs, x_out, mask=mask)
    # Stats of the stored (rounded) value: h is adaln_modulate of what we return.
    xhat, mean, rstd = _normalize(x_out.to(tl.float32), mask, D, eps)
    shift = tl.load(SHIFT + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    h = xhat * (1.0 + scale[None, :]) + shift[None, :]
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _ln_input_grad(dy, xhat, rstd, scale, D):
    """Gradient through y = xhat * (1 + scale) to the LayerNorm input, fp32 rows."""
    dxhat = dy * (1.0 + scale[None, :])
    mean_dxhat = tl.sum(dxhat, axis=1) / D
    mean_dxhat_xhat = tl.sum(dxhat * xhat, axis=1) / D
    return rstd[:, None] * (dxhat - mean_dxhat[:, None] - xhat * mean_dxhat_xhat[:, None])


@triton.jit
def _modulate_bwd_kernel(
    DOUT,  # *cdtype [B*T, D] grad of the output
    X,  # *xdtype [B*T, D] forward input
    SCALE,  # *cdtype [B, D]
    MEAN,  # *fp32 [B*T]
    RSTD,  # *fp32 [B*T]
    DX,  # *xdtype [B*T, D] grad of x
    PARTIAL,  # *fp32 [2, B, N_CHUNKS, D] per-chunk token sums: dshift, dscale
    T, D, ROWS_PER_CHUNK, N_CHUNKS, VEC_STRIDE,  # VEC_STRIDE = B * N_CHUNKS * D
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1)  # grid: (N_CHUNKS, B); ROWS_PER_CHUNK is a multiple of BLOCK_M
    chunk = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    scale = tl.load(SCALE + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, ROWS_PER_CHUNK, BLOCK_M):
        t = chunk * ROWS_PER_CHUNK + start + tl.arange(0, BLOCK_M)
        row_ok = t < T
        mask = row_ok[:, None] & col_ok[None, :]
        rows = b.to(tl.int64) * T + t
        offs = rows[:, None] * D + cols[None, :]
        dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dx = _ln_input_grad(dout, xhat, rstd, scale, D)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dshift += tl.sum(dout, axis=0)
        dscale += tl.sum(dout * xhat, axis=0)
    part = (b.to(tl.int64) * N_CHUNKS + chunk) * D + cols
    tl.store(PARTIAL + part, dshift, mask=col_ok)
    tl.store(PARTIAL + VEC_STRIDE + part, dscale, mask=col_ok)


@triton.jit
def _residual_bwd_kernel(
    DX_OUT,  # *xdtype [B*T, D] grad of x_out (read only if HAS_DX_OUT)
    DH,  # *cdtype [B*T, D] grad of h (read only if HAS_DH)
    X_OUT,  # *xdtype [B*T, D] forward output x_out (LN input)
    BRANCH,  # *cdtype [B*T, D] forward input y
    GATE,  # *cdtype [B, D]
    SCALE,  # *cdtype [B, D]
    MEAN,  # *fp32 [B*T]
    RSTD,  # *fp32 [B*T]
    DX,  # *xdtype [B*T, D] grad of x (= total grad of x_out)
    DBRANCH,  # *cdtype [B*T, D] grad of y
    PARTIAL,  # *fp32 [3, B, N_CHUNKS, D] per-chunk token sums: dgate, dshift, dscale
    T, D, ROWS_PER_CHUNK, N_CHUNKS, VEC_STRIDE,  # VEC_STRIDE = B * N_CHUNKS * D
    HAS_DX_OUT: tl.constexpr, HAS_DH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(1)  # grid: (N_CHUNKS, B); ROWS_PER_CHUNK is a multiple of BLOCK_M
    chunk = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    gate = tl.load(GATE + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    dgate = tl.zeros([BLOCK_D], dtype=tl.float32)
    dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
    dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, ROWS_PER_CHUNK, BLOCK_M):
        t = chunk * ROWS_PER_CHUNK + start + tl.arange(0, BLOCK_M)
        row_ok = t < T
        mask = row_ok[:, None] & col_ok[None, :]
        rows = b.to(tl.int64) * T + t
        offs = rows[:, None] * D + cols[None, :]
        d_resid = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # total grad of x_out
        if HAS_DH:
            dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
            x_out = tl.load(X_OUT + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = tl.where(mask, (x_out - mean[:, None]) * rstd[:, None], 0.0)
            d_resid += _ln_input_grad(dh, xhat, rstd, scale, D)
            dshift += tl.sum(dh, axis=0)
            dscale += tl.sum(dh * xhat, axis=0)
        if HAS_DX_OUT:
            d_resid += tl.load(DX_OUT + offs, mask=mask, other=0.0).to(tl.float32)
        branch = tl.load(BRANCH + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, d_resid.to(DX.dtype.element_ty), mask=mask)
        tl.store(DBRANCH + offs, (d_resid * gate[None, :]).to(DBRANCH.dtype.element_ty),
                 mask=mask)
        dgate += tl.sum(tl.where(mask, d_resid * branch, 0.0), axis=0)
    part = (b.to(tl.int64) * N_CHUNKS + chunk) * D + cols
    tl.store(PARTIAL + part, dgate, mask=col_ok)
    tl.store(PARTIAL + VEC_STRIDE + part, dshift, mask=col_ok)
    tl.store(PARTIAL + 2 * VEC_STRIDE + part, dscale, mask=col_ok)


@triton.jit
def _sum_chunks_kernel(
    PARTIAL,  # *fp32 [V, N_CHUNKS, D] per-chunk sums (V = n_vec * B)
    OUT,  # *cdtype [V, D] chunk totals
    N_CHUNKS, D,
    BLOCK_D: tl.constexpr,
):
    v = tl.program_id(0)  # grid: (V, cdiv(D, BLOCK_D))
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    base = v.to(tl.int64) * N_CHUNKS * D + cols
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for c in range(0, N_CHUNKS):  # fixed order: bitwise reproducible
        total += tl.load(PARTIAL + base + c * D, mask=col_ok, other=0.0)
    tl.store(OUT + v.to(tl.int64) * D + cols, total.to(OUT.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------- launchers
def _tile(T: int, D: int, interpret_rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps): full rows in registers; many rows per program
    under the interpreter (about 1 ms per program), about 2048 elements on a GPU."""
    block_d = triton.next_power_of_2(D)
    rows_cap = interpret_rows if _runtime.interpreter_active() else max(1, _GPU_TILE // block_d)
    block_m = min(rows_cap, triton.next_power_of_2(T))
    return block_m, block_d, min(8, max(1, block_m * block_d // 256))


def _chunking(B: int, T: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """(rows_per_chunk, n_chunks) for the backward grid (n_chunks, B)."""
    if _runtime.interpreter_active():
        rows = 2 * block_m
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        wanted = triton.cdiv(_GPU_PROGRAMS_PER_SM * _runtime.sm_count(index), B)
        n_chunks = min(max(1, wanted), triton.cdiv(T, block_m))
        rows = triton.cdiv(triton.cdiv(T, n_chunks), block_m) * block_m
    return rows, triton.cdiv(T, rows)


def _sum_chunks(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """partial: fp32 [n_vec, B, n_chunks, D] -> [n_vec, B, D] in `dtype`."""
    n_vec, B, n_chunks, D = partial.shape
    out = _runtime.empty((n_vec, B, D), dtype, partial.device)
    block_d = triton.next_power_of_2(D)
    if not _runtime.interpreter_active():
        block_d = min(block_d, 512)
    _sum_chunks_kernel[(n_vec * B, triton.cdiv(D, block_d))](
        partial, out, n_chunks, D, BLOCK_D=block_d, num_warps=4)
    return out


def _launch_modulate_fwd(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
    B, T, D = x.shape
    out = _runtime.empty(x.shape, shift.dtype, x.device)  # [B, T, D] compute dtype
    mean = _runtime.empty((B * T,), torch.float32, x.device)
    rstd = _runtime.empty((B * T,), torch.float32, x.device)
    if x.numel() > 0:
        block_m, block_d, warps = _tile(T, D, _INTERPRET_FWD_ROWS)
        _modulate_fwd_kernel[(triton.cdiv(T, block_m), B)](
            x, shift, scale, out, mean, rstd, T, D, eps,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    return out, mean, rstd


def _launch_modulate_bwd(
    dout: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    dout, x, scale = dout.contiguous(), x.contiguous(), scale.contiguous()
    B, T, D = x.shape
    dx = _runtime.empty(x.shape, x.dtype, x.device)  # [B, T, D]
    if x.numel() == 0:
        return dx, torch.zeros((2, B, D), dtype=scale.dtype, device=x.device)
    block_m, block_d, warps = _tile(T, D, _INTERPRET_BWD_ROWS)
    rows, n_chunks = _chunking(B, T, block_m, x.device)
    partial = _runtime.empty((2, B, n_chunks, D), torch.float32, x.device)
    _modulate_bwd_kernel[(n_chunks, B)](
        dout, x, scale, mean, rstd, dx, partial, T, D, rows, n_chunks, B * n_chunks * D,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    return dx, _sum_chunks(partial, scale.dtype)  # dx, [dshift, dscale]


def _launch_residual_fwd(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
    scale: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y, gate, shift, scale = (t.contiguous() for t in (x, y, gate, shift, scale))
    B, T, D = x.shape
    x_out = _runtime.empty(x.shape, x.dtype, x.device)  # [B, T, D] residual dtype
    h = _runtime.empty(x.shape, y.dtype, x.device)  # [B, T, D] compute dtype
    mean = _runtime.empty((B * T,), torch.float32, x.device)
    rstd = _runtime.empty((B * T,), torch.float32, x.device)
    if x.numel() > 0:
        block_m, block_d, warps = _tile(T, D, _INTERPRET_FWD_ROWS)
        _residual_fwd_kernel[(triton.cdiv(T, block_m), B)](
            x, y, gate, shift, scale, x_out, h, mean, rstd, T, D, eps,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    return x_out, h, mean, rstd


def _launch_residual_bwd(
    dx_out: torch.Tensor | None, dh: torch.Tensor | None, x_out: torch.Tensor,
    y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
    rstd: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x_out, y, gate, scale = (t.contiguous() for t in (x_out, y, gate, scale))
    B, T, D = x_out.shape
    dx = _runtime.empty(x_out.shape, x_out.dtype, x_out.device)  # [B, T, D]
    dy = _runtime.empty(x_out.shape, y.dtype, x_out.device)  # [B, T, D]
    if x_out.numel() == 0:
        return dx, dy, torch.zeros((3, B, D), dtype=gate.dtype, device=x_out.device)
    block_m, block_d, warps = _tile(T, D, _INTERPRET_BWD_ROWS)
    rows, n_chunks = _chunking(B, T, block_m, x_out.device)
    partial = _runtime.empty((3, B, n_chunks, D), torch.float32, x_out.device)
    # An absent grad is never read (constexpr flag); pass any tensor as its pointer.
    _residual_bwd_kernel[(n_chunks, B)](
        x_out if dx_out is None else dx_out.contiguous(),
        x_out if dh is None else dh.contiguous(),
        x_out, y, gate, scale, mean, rstd, dx, dy, partial,
        T, D, rows, n_chunks, B * n_chunks * D,
        HAS_DX_OUT=dx_out is not None, HAS_DH=dh is not None,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps)
    return dx, dy, _sum_chunks(partial, gate.dtype)  # dx, dy, [dgate, dshift, dscale]


# ----------------------------------------------------------------------------- torch.library
def _modulate_fwd_fake(x, shift, scale, eps):
    stats = x.new_empty((x.shape[0] * x.shape[1],), dtype=torch.float32)
    return x.new_empty(x.shape, dtype=shift.dtype), stats, torch.empty_like(stats)


def _modulate_bwd_fake(dout, x, scale, mean, rstd):
    return x.new_empty(x.shape), x.new_empty((2, x.shape[0], x.shape[2]), dtype=scale.dtype)


def _residual_fwd_fake(x, y, gate, shift, scale, eps):
    stats = x.new_empty((x.shape[0] * x.shape[1],), dtype=torch.float32)
    return x.new_empty(x.shape), y.new_empty(x.shape), stats, torch.empty_like(stats)


def _residual_bwd_fake(dx_out, dh, x_out, y, gate, scale, mean, rstd):
    B, _, D = x_out.shape
    return x_out.new_empty(x_out.shape), y.new_empty(y.shape), gate.new_empty((3, B, D))


_modulate_fwd = KernelOp("adaln_modulate_fwd", _launch_modulate_fwd, _modulate_fwd_fake)
_modulate_bwd = KernelOp("adaln_modulate_bwd", _launch_modulate_bwd, _modulate_bwd_fake)
_residual_fwd = KernelOp("adaln_residual_gate_fwd", _launch_residual_fwd, _residual_fwd_fake)
_residual_bwd = KernelOp("adaln_residual_gate_bwd", _launch_residual_bwd, _residual_bwd_fake)


# ----------------------------------------------------------------------------- autograd
class AdaLNModulateFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        x = x.contiguous()  # saved for backward: copy once here, not in every backward
        out, mean, rstd = _modulate_fwd(x, shift, scale, eps)
        ctx.save_for_backward(x, scale, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, dout):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dvecs = _modulate_bwd(dout, x, scale, mean, rstd)
        return dx, dvecs[0], dvecs[1], None


class ResidualGateAdaLNFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, gate, shift, scale, eps):
        y = y.contiguous()
        x_out, h, mean, rstd = _residual_fwd(x, y, gate, shift, scale, eps)
        ctx.save_for_backward(x_out, y, gate, scale, mean, rstd)
        ctx.set_materialize_grads(False)  # an unused output costs no zero-filled grad
        return x_out, h

    @staticmethod
    def backward(ctx, dx_out, dh):
        x_out, y, gate, scale, mean, rstd = ctx.saved_tensors
        dx, dy, dvecs = _residual_bwd(dx_out, dh, x_out, y, gate, scale, mean, rstd)
        return dx, dy, dvecs[0], dvecs[1], dvecs[2], None


# ----------------------------------------------------------------------------- public ops
def _check_inputs(eps: float, rows: dict[str, torch.Tensor],
                  vectors: dict[str, torch.Tensor]) -> None:
    for name, t in {**rows, **vectors}.items():
        _checks.check_float(name, t)
    _checks.check_shape("x", rows["x"], (None, None, None), "[B, T, D]")
    B, T, D = rows["x"].shape
    for name, t in rows.items():
        _checks.check_shape(name, t, (B, T, D), f"[B, T, D] = [{B}, {T}, {D}] (as x)")
    for name, t in vectors.items():
        _checks.check_shape(name, t, (B, D), f"[B, D] = [{B}, {D}] (B and D of x)")
    compute = {k: v for k, v in {**rows, **vectors}.items() if k != "x"}
    _checks.check_same_dtype(**compute)
    cdtype = next(iter(compute.values())).dtype
    if rows["x"].dtype not in (cdtype, torch.float32):
        names = "/".join(compute)
        raise TypeError(f"x (the residual stream) must be float32 or share the dtype of "
                        f"{names} ({cdtype}), got {rows['x'].dtype}")
    _checks.check_same_device(**rows, **vectors)
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def _fused(x: torch.Tensor, *others: torch.Tensor) -> bool:
    fits = x.numel() > 0 and x.shape[-1] <= MAX_FUSED_D and x.shape[0] <= _MAX_GRID_B
    return fits and _runtime.use_triton(x, *others)


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]; x [B, T, D], shift/scale [B, D].
    x is fp32 or shares shift/scale's dtype; the result takes shift/scale's dtype."""
    _check_inputs(eps, {"x": x}, {"shift": shift, "scale": scale})
    if _fused(x, shift, scale):
        if not needs_autograd(x, shift, scale):
            return _modulate_fwd(x, shift, scale, eps)[0]
        return AdaLNModulateFunction.apply(x, shift, scale, eps)
    return adaln_modulate_ref(x, shift, scale, eps)


def residual_gate_adaln(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                        shift: torch.Tensor, scale: torch.Tensor,
                        eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_out, h) with x_out = x + gate[:, None] * y and h = adaln_modulate(x_out, ...).
    y, gate, shift, scale share a compute dtype; x is fp32 or that dtype. x_out takes x's
    dtype, h the compute dtype."""
    _check_inputs(eps, {"x": x, "y": y}, {"gate": gate, "shift": shift, "scale": scale})
    if _fused(x, y, gate, shift, scale):
        if not needs_autograd(x, y, gate, shift, scale):
            x_out, h, _, _ = _residual_fwd(x, y, gate, shift, scale, eps)
            return x_out, h
        return ResidualGateAdaLNFunction.apply(x, y, gate, shift, scale, eps)
    return residual_gate_adaln_ref(x, y, gate, shift, scale, eps)
