"""Masked token gather and scatter: the encoder drops tokens, the decoder puts them back.

Math (b over the batch, j over kept tokens, l over all L positions):
    gather_tokens(x, ids_keep, pos)        out[b, j] = x[b, ids_keep[b, j]] (+ pos[ids_keep[b, j]])
    scatter_tokens(x_keep, ids_keep, fill)  out[b, l] = x_keep[b, j] if ids_keep[b, j] == l,
                                            else fill[b, l] ([B, L, D] fill) or fill ([D] fill)
Shapes: x [B, L, D], ids_keep [B, K] int32/int64, unique within a row, values in [0, L),
K <= L; pos [L, D]; x_keep [B, K, D]; fill [B, L, D] (SD-DiT: the student's own noisy
tokens) or [D] (MaskDiT's learned mask token, with `length` = L). Float inputs share one
dtype: fp32, fp16 or bf16. Outputs are exact copies (gather with pos: one rounding of an
fp32 add, as torch does).

Backward, every floating input:
    gather:  dx = dout scattered into zeros; dpos[l] = sum_b dx[b, l] (only when pos needs it)
    scatter: dx_keep = dout gathered at ids; d(fill [B,L,D]) = dout with kept rows zeroed;
             d(fill [D]) = sum of dout over every masked row of every sample.

Design:
- Row copies. A program moves tiles of BLOCK_R whole rows (the full D vectorised), so
  each output row is written exactly once with plain stores: no memset, no atomics.
- Scatter-side kernels run over all L output rows and find each row's source slot j by
  comparing its position with the sample's ids (an inverse map computed in registers from
  K ids that sit in L2). That saves building an inverse map in a separate launch; the
  cost is K compares per row, small next to a D-wide row copy for K up to a few thousand.
- Sums are deterministic: dpos loops over the batch in order inside the program that owns
  a position; d(fill [D]) writes one fp32 partial per program, then a second kernel adds
  the partials in a fixed order. Both accumulate in fp32. The dpos path (a learned pos
  only; DiT's sin-cos pos takes no grad and skips it) is the slow one: it splits D across
  programs to make up for walking the batch serially.
- The public ops check ids on the host (range and duplicates: one sort and one min/max
  reduction, a single device sync). Pass check_ids=False in hot loops where the ids come
  from argsort and are known good; under torch.compile the value check is skipped.
- Launchers are torch.library custom ops (`_ops.KernelOp`): compile traces the ops, eager
  calls run the launchers directly, the same call path as the adaLN and EDM ops.
Limits: duplicate ids are a precondition (checked only with check_ids); row counts
(B*L) must fit in int32, element offsets are int64. Under the Triton interpreter an
fp32 -> bf16 cast truncates (a GPU rounds to nearest even), so a bf16 gather with pos and
the bf16 sums can differ from torch by one ulp there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sdkernels import _checks, _runtime
from sdkernels._ops import KernelOp, needs_autograd

# ---------------------------------------------------------------- references (the spec)


def gather_tokens_ref(x: torch.Tensor, ids_keep: torch.Tensor,
                      pos: torch.Tensor | None = None) -> torch.Tensor:
    index = ids_keep.long()  # [B, K]
    out = x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))  # [B, K, D]
    if pos is not None:
        out = out + pos[index]  # [B, K, D]
    return out


def scatter_tokens_ref(x_keep: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor,
                       length: int | None = None) -> torch.Tensor:
    B, _, D = x_keep.shape
    base = fill.expand(B, length, D) if fill.dim() == 1 else fill  # [B, L, D]
    index = ids_keep.long()[..., None].expand_as(x_keep)  # [B, K, D]
    return base.scatter(1, index, x_keep)  # [B, L, D]


# ---------------------------------------------------------------- Triton kernels


@triton.jit
def _slot_of(ids_row_ptr, K, positions, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """For each of BLOCK_R positions, the j with ids_row[j] == position, or -1 (masked).
    ids_row_ptr: [K] int32/int64 kept positions of one sample."""
    slot = tl.full([BLOCK_R], -1, tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        ids = tl.load(ids_row_ptr + k, mask=k < K, other=-1).to(tl.int32)
        hit = ids[None, :] == positions[:, None]  # [BLOCK_R, BLOCK_K]
        slot = tl.maximum(slot, tl.max(tl.where(hit, k[None, :], -1), axis=1))
    return slot


@triton.jit
def _gather_kernel(
    out_ptr,  # [B*K, D] gathered rows (written)
    x_ptr,  # [B, L, D] source tokens
    pos_ptr,  # [L, D] added to each gathered row; read only when HAS_POS
    ids_ptr,  # [B*K] int32/int64 source position of each output row
    n_rows, K, L, D, tiles_per_prog,
    HAS_POS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    for t in range(tiles_per_prog):
        rows = (pid * tiles_per_prog + t) * BLOCK_R + tl.arange(0, BLOCK_R)
        live = rows < n_rows
        src = tl.load(ids_ptr + rows, mask=live, other=0).to(tl.int64)
        ok = live[:, None] & d_ok[None, :]
        src_row = (rows // K).to(tl.int64) * L + src
        val = tl.load(x_ptr + src_row[:, None] * D + d[None, :], mask=ok)
        if HAS_POS:
            p = tl.load(pos_ptr + src[:, None] * D + d[None, :], mask=ok)
            val = val.to(tl.float32) + p.to(tl.float32)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + d[None, :],
                 val.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scatter_kernel(
    out_ptr,  # [B, L, D] output (written, every row once)
    keep_ptr,  # [B, K, D] rows for kept positions
    fill_ptr,  # FILL=2: [B, L, D]; FILL=1: [D]; FILL=0: unused (zeros)
    ids_ptr,  # [B, K] int32/int64 kept positions
    B, L, K, D, n_lt, tiles_per_prog,
    FILL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    if FILL == 1:
        fill_row = tl.load(fill_ptr + d, mask=d_ok)
    for t in range(tiles_per_prog):
        tile = pid * tiles_per_prog + t
        b = tl.minimum(tile // n_lt, B - 1)  # tiles past the end are fully masked below
        l = (tile % n_lt) * BLOCK_R + tl.arange(0, BLOCK_R)
        # A tensor operand on both sides: triton 3.9's interpreter rejects tensor & scalar masks.
        live = (l < L) & ((l * 0 + tile) < B * n_lt)
        slot = _slot_of(ids_ptr + b * K, K, l, BLOCK_R, BLOCK_K)
        kept = live & (slot >= 0)
        src = (b * K + slot).to(tl.int64)
        dst = (b * L + l).to(tl.int64)
        val = tl.load(keep_ptr + src[:, None] * D + d[None, :],
                      mask=kept[:, None] & d_ok[None, :])
        if FILL == 2:
            other = tl.load(fill_ptr + dst[:, None] * D + d[None, :],
                            mask=(live & (slot < 0))[:, None] & d_ok[None, :])
            val = tl.where(kept[:, None], val, other)
        elif FILL == 1:
            val = tl.where(kept[:, None], val, fill_row[None, :])
        else:
            val = tl.where(kept[:, None], val, 0.0)
        tl.store(out_ptr + dst[:, None] * D + d[None, :], val.to(out_ptr.dtype.element_ty),
                 mask=live[:, None] & d_ok[None, :])


@triton.jit
def _scatter_bwd_kernel(
    dkeep_ptr,  # [B, K, D] grad of x_keep (written when WRITE_KEEP)
    dfill_ptr,  # [B, L, D] grad of a full fill (written when FILL_GRAD == 2)
    partial_ptr,  # [n_programs, D] fp32 per-program sums for a [D] fill (FILL_GRAD == 1)
    g_ptr,  # [B, L, D] grad of the output
    ids_ptr,  # [B, K] int32/int64 kept positions
    B, L, K, D, n_lt, tiles_per_prog,
    WRITE_KEEP: tl.constexpr, FILL_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    for t in range(tiles_per_prog):
        tile = pid * tiles_per_prog + t
        b = tl.minimum(tile // n_lt, B - 1)
        l = (tile % n_lt) * BLOCK_R + tl.arange(0, BLOCK_R)
        # A tensor operand on both sides: triton 3.9's interpreter rejects tensor & scalar masks.
        live = (l < L) & ((l * 0 + tile) < B * n_lt)
        slot = _slot_of(ids_ptr + b * K, K, l, BLOCK_R, BLOCK_K)
        kept = live & (slot >= 0)
        masked = live & (slot < 0)
        dst = (b * L + l).to(tl.int64)
        g = tl.load(g_ptr + dst[:, None] * D + d[None, :], mask=live[:, None] & d_ok[None, :],
                    other=0.0)
        if WRITE_KEEP:
            src = (b * K + slot).to(tl.int64)
            tl.store(dkeep_ptr + src[:, None] * D + d[None, :], g,
                     mask=kept[:, None] & d_ok[None, :])
        if FILL_GRAD == 2:
            tl.store(dfill_ptr + dst[:, None] * D + d[None, :],
                     tl.where(kept[:, None], 0.0, g).to(dfill_ptr.dtype.element_ty),
                     mask=live[:, None] & d_ok[None, :])
        if FILL_GRAD == 1:
            acc += tl.sum(tl.where(masked[:, None], g.to(tl.float32), 0.0), axis=0)
    if FILL_GRAD == 1:
        tl.store(partial_ptr + pid * D + d, acc, mask=d_ok)


@triton.jit
def _sum_partials_kernel(
    out_ptr,  # [D] the sum, in the grad dtype (written)
    partial_ptr,  # [n_partials, D] fp32 partial sums, added in row order
    n_partials, D,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    acc = tl.zeros([BLOCK_D], tl.float32)
    for p0 in range(0, n_partials, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        part = tl.load(partial_ptr + p[:, None] * D + d[None, :],
                       mask=(p < n_partials)[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(part, axis=0)
    tl.store(out_ptr + d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _gather_bwd_pos_kernel(
    dx_ptr,  # [B, L, D] grad of x: dout scattered into zeros (written when WRITE_DX)
    dpos_ptr,  # [L, D] grad of pos: dx summed over the batch (written)
    g_ptr,  # [B, K, D] grad of the gathered output
    ids_ptr,  # [B, K] int32/int64 kept positions
    B, L, K, D, n_lt, tiles_per_prog,
    WRITE_DX: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # A program owns positions and walks the batch in order: a deterministic sum.
    pid = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    for t in range(tiles_per_prog):
        l = (pid * tiles_per_prog + t) * BLOCK_R + tl.arange(0, BLOCK_R)
        live = l < L
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for b in range(B):
            slot = _slot_of(ids_ptr + b * K, K, l, BLOCK_R, BLOCK_K)
            kept = live & (slot >= 0)
            src = (b * K + slot).to(tl.int64)
            g = tl.load(g_ptr + src[:, None] * D + d[None, :], mask=kept[:, None] & d_ok[None, :],
                        other=0.0)
            if WRITE_DX:
                dst = (b * L + l).to(tl.int64)
                tl.store(dx_ptr + dst[:, None] * D + d[None, :], g,
                         mask=live[:, None] & d_ok[None, :])
            acc += g.to(tl.float32)
        tl.store(dpos_ptr + l.to(tl.int64)[:, None] * D + d[None, :],
                 acc.to(dpos_ptr.dtype.element_ty), mask=live[:, None] & d_ok[None, :])


# ---------------------------------------------------------------- launch configuration

# GPU blocks are reasoned, not yet tuned on a device: see bench/cases/tokens.py.
_TILE_ELEMS_GPU = 4096  # elements per [BLOCK_R, BLOCK_D] tile: 32 per thread at 4 warps
# The [D]-fill backward keeps one fp32 partial row per program, so it runs few programs
# (2 per SM: partials ~7% of its traffic at XL/2) with bigger tiles and 16 warps instead
# (8 warps spill on sm_90 at this tile).
_REDUCE_TILE_ELEMS_GPU, _REDUCE_PROGRAMS_PER_SM, _REDUCE_WARPS = 16384, 2, 16
_TILE_ELEMS_INTERP = 1 << 17  # the interpreter pays per op, not per element: big tiles
_INTERP_PROGRAMS = 4  # ~1 ms per program instance under the interpreter


def _row_blocks(D: int, rows_hint: int, interp: bool,
                gpu_tile: int = _TILE_ELEMS_GPU) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) for kernels that move whole D-wide rows."""
    block_d = triton.next_power_of_2(D)
    budget = _TILE_ELEMS_INTERP if interp else gpu_tile
    return max(1, min(budget // block_d, triton.next_power_of_2(rows_hint))), block_d


def _pos_bwd_blocks(D: int, L: int, interp: bool) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D) for the dpos kernel: on GPU, D is split across programs because
    each program walks the whole batch."""
    if interp:
        return _row_blocks(D, L, interp)
    return 4, min(triton.next_power_of_2(D), 256)


def _block_k(K: int, interp: bool) -> int:
    return min(triton.next_power_of_2(max(K, 1)), 1024 if interp else 256)


def _programs(n_tiles: int, interp: bool, device: torch.device, per_sm: int = 0) -> tuple[int, int]:
    """(grid size, tiles per program). per_sm > 0 caps the grid at per_sm x SMs on GPU, for
    kernels that keep one partial sum per program."""
    if interp:
        n_prog = min(n_tiles, _INTERP_PROGRAMS)
    elif per_sm:
        n_prog = min(n_tiles, per_sm * _runtime.sm_count(device.index or 0))
    else:
        n_prog = n_tiles
    tiles_per_prog = triton.cdiv(n_tiles, n_prog)
    return triton.cdiv(n_tiles, tiles_per_prog), tiles_per_prog


# ---------------------------------------------------------------- launchers


def _launch_gather(x: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    x, ids = x.contiguous(), ids.contiguous()
    B, L, D = x.shape
    K = ids.shape[1]
    out = _runtime.empty((B, K, D), x.dtype, x.device)
    if out.numel() == 0:
        return out
    interp = _runtime.interpreter_active()
    block_r, block_d = _row_blocks(D, B * K, interp)
    grid, per_prog = _programs(triton.cdiv(B * K, block_r), interp, x.device)
    pos_arg = x if pos is None else pos.contiguous()
    _gather_kernel[(grid, 1)](out, x, pos_arg, ids, B * K, K, L, D, per_prog,
                              HAS_POS=pos is not None, BLOCK_R=block_r, BLOCK_D=block_d,
                              num_warps=4)
    return out


def _launch_scatter(x_keep: torch.Tensor, ids: torch.Tensor, fill: torch.Tensor | None,
                    length: int) -> torch.Tensor:
    """fill None means zeros (the backward of gather)."""
    x_keep, ids = x_keep.contiguous(), ids.contiguous()
    B, K, D = x_keep.shape
    L = length
    out = _runtime.empty((B, L, D), x_keep.dtype, x_keep.device)
    if out.numel() == 0:
        return out
    if K == 0:  # nothing kept: the output is the fill
        return out.copy_(fill.expand(B, L, D)) if fill is not None else out.zero_()
    interp = _runtime.interpreter_active()
    block_r, block_d = _row_blocks(D, L, interp)
    n_lt = triton.cdiv(L, block_r)
    grid, per_prog = _programs(B * n_lt, interp, x_keep.device)
    kind = 0 if fill is None else (1 if fill.dim() == 1 else 2)
    fill_arg = x_keep if fill is None else fill.contiguous()
    _scatter_kernel[(grid, 1)](out, x_keep, fill_arg, ids, B, L, K, D, n_lt, per_prog,
                               FILL=kind, BLOCK_R=block_r, BLOCK_D=block_d,
                               BLOCK_K=_block_k(K, interp), num_warps=4)
    return out


def _launch_scatter_bwd(grad: torch.Tensor, ids: torch.Tensor, fill_dim: int,
                        need_keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(d x_keep or an empty tensor, d fill) for a fill of rank fill_dim (1 or 3)."""
    grad, ids = grad.contiguous(), ids.contiguous()
    B, L, D = grad.shape
    K = ids.shape[1]
    dev, dtype = grad.device, grad.dtype
    dkeep = _runtime.empty((B, K, D) if need_keep else (0,), dtype, dev)
    dfill = _runtime.empty((D,) if fill_dim == 1 else (B, L, D), dtype, dev)
    if grad.numel() == 0 or K == 0:
        dfill.copy_(grad.sum((0, 1)) if fill_dim == 1 else grad)
        return dkeep, dfill
    interp = _runtime.interpreter_active()
    vector = fill_dim == 1
    block_r, block_d = _row_blocks(D, L, interp, _REDUCE_TILE_ELEMS_GPU if vector else
                                   _TILE_ELEMS_GPU)
    n_lt = triton.cdiv(L, block_r)
    grid, per_prog = _programs(B * n_lt, interp, dev, _REDUCE_PROGRAMS_PER_SM if vector else 0)
    partial = _runtime.empty((grid, D) if vector else (0,), torch.float32, dev)
    _scatter_bwd_kernel[(grid, 1)](dkeep, dfill, partial, grad, ids, B, L, K, D, n_lt, per_prog,
                                   WRITE_KEEP=need_keep, FILL_GRAD=1 if vector else 2,
                                   BLOCK_R=block_r, BLOCK_D=block_d, BLOCK_K=_block_k(K, interp),
                                   num_warps=_REDUCE_WARPS if vector else 4)
    if vector:
        _launch_sum_partials(dfill, partial)
    return dkeep, dfill


def _launch_sum_partials(out: torch.Tensor, partial: torch.Tensor) -> None:
    n_partials, D = partial.shape
    block_d = triton.next_power_of_2(D) if _runtime.interpreter_active() else 32
    block_p = min(triton.next_power_of_2(n_partials), 128)
    _sum_partials_kernel[(triton.cdiv(D, block_d),)](out, partial, n_partials, D,
                                                     BLOCK_P=block_p, BLOCK_D=block_d,
                                                     num_warps=4)


def _launch_gather_bwd_pos(grad: torch.Tensor, ids: torch.Tensor, length: int,
                           need_dx: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx or an empty tensor, dpos). Slower than the dx-only path: a program walks the
    batch to keep the pos sum deterministic, so D is split across programs for width."""
    grad, ids = grad.contiguous(), ids.contiguous()
    B, K, D = grad.shape
    L = length
    dev, dtype = grad.device, grad.dtype
    dx = _runtime.empty((B, L, D) if need_dx else (0,), dtype, dev)
    dpos = _runtime.empty((L, D), dtype, dev)
    if dpos.numel() == 0:
        return dx, dpos
    if B == 0 or K == 0:
        dpos.zero_()
        return dx.zero_(), dpos
    interp = _runtime.interpreter_active()
    block_r, block_d = _pos_bwd_blocks(D, L, interp)
    n_lt = triton.cdiv(L, block_r)
    grid, per_prog = _programs(n_lt, interp, dev)
    _gather_bwd_pos_kernel[(grid, triton.cdiv(D, block_d))](
        dx, dpos, grad, ids, B, L, K, D, n_lt, per_prog, WRITE_DX=need_dx, BLOCK_R=block_r,
        BLOCK_D=block_d, BLOCK_K=_block_k(K, interp), num_warps=4)
    return dx, dpos


# ---------------------------------------------------------------- torch.library + autograd


def _gather_fake(x: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], ids.shape[1], x.shape[2]))


def _scatter_fake(x_keep: torch.Tensor, ids: torch.Tensor, fill: torch.Tensor | None,
                  length: int) -> torch.Tensor:
    return x_keep.new_empty((x_keep.shape[0], length, x_keep.shape[2]))


def _scatter_bwd_fake(grad: torch.Tensor, ids: torch.Tensor, fill_dim: int,
                      need_keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, _, D = grad.shape
    dkeep = grad.new_empty((B, ids.shape[1], D) if need_keep else (0,))
    return dkeep, grad.new_empty((D,) if fill_dim == 1 else grad.shape)


def _gather_bwd_pos_fake(grad: torch.Tensor, ids: torch.Tensor, length: int,
                         need_dx: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, _, D = grad.shape
    dx = grad.new_empty((B, length, D) if need_dx else (0,))
    return dx, grad.new_empty((length, D))


_gather_op = KernelOp("tokens_gather", _launch_gather, _gather_fake)
_scatter_op = KernelOp("tokens_scatter", _launch_scatter, _scatter_fake)
_scatter_bwd_op = KernelOp("tokens_scatter_backward", _launch_scatter_bwd, _scatter_bwd_fake)
_gather_bwd_pos_op = KernelOp("tokens_gather_backward_pos", _launch_gather_bwd_pos,
                              _gather_bwd_pos_fake)


class GatherTokensFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, ids_keep: torch.Tensor,
                pos: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(ids_keep)
        ctx.length = x.shape[1]
        return _gather_op(x, ids_keep, pos)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        need_x, _, need_pos = ctx.needs_input_grad
        if need_pos:
            dx, dpos = _gather_bwd_pos_op(grad, ids, ctx.length, need_x)
            return (dx if need_x else None), None, dpos
        dx = _scatter_op(grad, ids, None, ctx.length) if need_x else None
        return dx, None, None


class ScatterTokensFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_keep: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor,
                length: int) -> torch.Tensor:
        ctx.save_for_backward(ids_keep)
        ctx.fill_dim = fill.dim()
        return _scatter_op(x_keep, ids_keep, fill, length)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        need_keep, _, need_fill, _ = ctx.needs_input_grad
        if need_fill:
            dkeep, dfill = _scatter_bwd_op(grad, ids, ctx.fill_dim, need_keep)
            return (dkeep if need_keep else None), None, dfill, None
        dkeep = _gather_op(grad, ids, None) if need_keep else None
        return dkeep, None, None, None


# ---------------------------------------------------------------- public ops


def _check_ids_values(ids_keep: torch.Tensor, length: int) -> None:
    """Range [0, length) and uniqueness per row, with one device sync."""
    if ids_keep.numel() == 0 or torch.compiler.is_compiling():
        return
    lo, hi = torch.aminmax(ids_keep)
    ordered = ids_keep.sort(dim=1).values  # [B, K]
    dups = (ordered[:, 1:] == ordered[:, :-1]).sum()
    lo_v, hi_v, dups_v = torch.stack([lo.long(), hi.long(), dups.long()]).tolist()
    if lo_v < 0 or hi_v >= length:
        raise ValueError(f"ids_keep values must lie in [0, {length}), got min {lo_v}, max {hi_v}")
    if dups_v:
        raise ValueError(f"ids_keep must be unique within each row, found {dups_v} duplicate(s)")


def _check_ids(ids: torch.Tensor, B: int, K: int | None, length: int, check_ids: bool) -> None:
    _checks.check_shape("ids_keep", ids, (B, K), f"[B={B}, K{'' if K is None else f'={K}'}]")
    if ids.shape[1] > length:
        raise ValueError(f"ids_keep keeps K={ids.shape[1]} tokens, more than L={length}")
    if check_ids:
        _check_ids_values(ids, length)


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, pos: torch.Tensor | None = None,
                  *, check_ids: bool = True) -> torch.Tensor:
    """out[b, j] = x[b, ids_keep[b, j]] (+ pos[ids_keep[b, j]]). x [B, L, D], ids_keep
    [B, K] int32/int64 unique per row, pos [L, D] or None. Returns [B, K, D].
    check_ids=False skips the host-side range/duplicate check (and its device sync)."""
    _checks.check_float("x", x)
    _checks.check_index("ids_keep", ids_keep)
    _checks.check_shape("x", x, (None, None, None), "[B, L, D]")
    B, L, D = x.shape
    if pos is not None:
        _checks.check_float("pos", pos)
        _checks.check_shape("pos", pos, (L, D), f"[L={L}, D={D}]")
    _checks.check_same_device(x=x, ids_keep=ids_keep, pos=pos)
    _checks.check_same_dtype(x=x, pos=pos)
    _check_ids(ids_keep, B, None, L, check_ids)
    tensors = (x, ids_keep) if pos is None else (x, ids_keep, pos)
    if _runtime.use_triton(*tensors):
        if not needs_autograd(x, pos):
            return _gather_op(x, ids_keep, pos)
        return GatherTokensFunction.apply(x, ids_keep, pos)
    return gather_tokens_ref(x, ids_keep, pos)


def scatter_tokens(x_keep: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor,
                   length: int | None = None, *, check_ids: bool = True) -> torch.Tensor:
    """out[b, ids_keep[b, j]] = x_keep[b, j]; every other row takes fill. x_keep [B, K, D],
    ids_keep [B, K] int32/int64 unique per row, fill [B, L, D] or [D] (then `length` = L).
    Returns [B, L, D]. check_ids=False skips the host-side check of the ids' values."""
    _checks.check_float("x_keep", x_keep)
    _checks.check_index("ids_keep", ids_keep)
    _checks.check_float("fill", fill)
    _checks.check_shape("x_keep", x_keep, (None, None, None), "[B, K, D]")
    B, K, D = x_keep.shape
    if fill.dim() == 1:
        _checks.check_shape("fill", fill, (D,), f"[D={D}] or [B={B}, L, D={D}]")
        if length is None:
            raise ValueError("length is required with a [D] fill: it gives L")
        if not isinstance(length, int | torch.SymInt) or isinstance(length, bool) or length < 0:
            raise TypeError(f"length must be a non-negative int, got {length!r}")
    else:
        _checks.check_shape("fill", fill, (B, None, D), f"[B={B}, L, D={D}] or [D={D}]")
        if length is not None and length != fill.shape[1]:
            raise ValueError(f"length={length} disagrees with fill's L={fill.shape[1]}")
        length = fill.shape[1]
    _checks.check_same_device(x_keep=x_keep, ids_keep=ids_keep, fill=fill)
    _checks.check_same_dtype(x_keep=x_keep, fill=fill)
    _check_ids(ids_keep, B, K, length, check_ids)
    if _runtime.use_triton(x_keep, ids_keep, fill):
        if not needs_autograd(x_keep, fill):
            return _scatter_op(x_keep, ids_keep, fill, length)
        return ScatterTokensFunction.apply(x_keep, ids_keep, fill, length)
    return scatter_tokens_ref(x_keep, ids_keep, fill, length)
