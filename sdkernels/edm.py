"""EDM preconditioning and denoising loss (Karras et al. 2022), fused into one pass each.

Math, with sd = sigma_data and per-sample noise level sigma:

    x_noisy   = x0 + sigma * noise
    c_in      = 1 / sqrt(sigma^2 + sd^2)          x_in = c_in * x_noisy
    c_noise   = ln(sigma) / 4
    c_skip    = sd^2 / (sigma^2 + sd^2)           c_out = sigma * sd / sqrt(sigma^2 + sd^2)
    lambda    = (sigma^2 + sd^2) / (sigma * sd)^2
    D         = c_skip * x_noisy + c_out * F
    loss[b]   = mean_e lambda * (D - x0)^2

`edm_precondition(x0, noise, sigma, sigma_min=None, sigma_data=0.5)` returns
(x_noisy, x_in, c_noise), plus the teacher view x_in_teacher = c_in(sigma_min) *
(x0 + sigma_min * noise) when `sigma_min` is given, from the same read of x0 and noise.

`edm_loss(F, x_noisy, x0, sigma, sigma_data=0.5, patch_weight=None, patch_size=None)`
returns loss [B] in fp32. With `patch_weight` [B, L] and `patch_size` p the tensors are
images [B, C, H, W] cut into L = (H/p)(W/p) patches in row-major order, and
loss[b] = sum_l w[b, l] * patch_mean_l / sum_l w[b, l] (MaskDiT's kept-patch loss with
0/1 weights). A row whose weights are all zero gives loss 0 and zero gradients.

Shapes and dtypes: x0, noise, F, x_noisy are [B, ...] in one of fp32/fp16/bf16; sigma is
[B], positive and finite, any float dtype (used in fp32). Outputs keep the input dtype;
c_noise and the loss are fp32. Everything is computed and accumulated in fp32.

Gradients: every tensor input, sigma included (c_noise's part in torch). The exception is
patch_weight, a mask: passing one that requires grad is an error.

Design:
- Each sample is flattened to N elements; the grid is (B, chunks of BLOCK elements), so
  per-sample constants are computed once per program from sigma[b].
- Per-sample sums (the loss, d/dsigma) are deterministic: each program writes one fp32
  partial, then torch sums the [B, chunks] partials (skipped when chunks == 1). No atomics.
- The loss computes D - x0 as c_skip*(x_noisy - x0) - (1 - c_skip)*x0 + c_out*F, which
  avoids the cancellation of c_skip*x_noisy - x0 at small sigma (c_skip -> 1).
- A patch weight is normalised inside the kernel: each program sums its row of w
  (L values, from cache) rather than launching torch ops for it.
- Value checks (sigma > 0, w >= 0) need one host sync; `check=False` skips them, and they
  are skipped while torch.compile traces.
- Host time matters as much as device time here (an XL/2 batch is ~1 MB): eager calls run
  the launchers directly rather than through the torch.ops dispatcher (`_ops.KernelOp`,
  shared with the adaLN and token ops), and skip the autograd.Function when nothing needs
  a gradient. Traced calls use the registered ops.
Limits: sigma below ~1e-15 overflows lambda in fp32.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from sdkernels import _runtime
from sdkernels._checks import check_float, check_same_device, check_same_dtype
from sdkernels._ops import KernelOp, needs_autograd

# ----------------------------------------------------------------------------- references


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] broadcasting against `like`."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _coefficient_dtype(x: Tensor) -> torch.dtype:
    """Per-sample coefficients and sums are fp32 (fp64 for an fp64 oracle)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def edm_precondition_ref(x0: Tensor, noise: Tensor, sigma: Tensor, sigma_min: float | None = None,
                         sigma_data: float = 0.5) -> tuple[Tensor, ...]:
    """Coefficients in fp32, elementwise math in x0's dtype."""
    s = sigma.to(_coefficient_dtype(x0))
    c_in = torch.rsqrt(s * s + sigma_data**2).to(x0.dtype)  # [B]
    x_noisy = x0 + _per_sample(s.to(x0.dtype), x0) * noise
    x_in = x_noisy * _per_sample(c_in, x0)
    c_noise = torch.log(s) / 4
    if sigma_min is None:
        return x_noisy, x_in, c_noise
    c_in_teacher = 1.0 / math.sqrt(sigma_min**2 + sigma_data**2)
    x_in_teacher = (x0 + sigma_min * noise) * c_in_teacher
    return x_noisy, x_in, c_noise, x_in_teacher


def patch_means(err: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, L]: the mean of each p x p patch (over channels too), row-major."""
    B, C, H, W = err.shape
    p = patch_size
    return err.reshape(B, C, H // p, p, W // p, p).mean(dim=(1, 3, 5)).flatten(1)


def weighted_mean(values: Tensor, weight: Tensor) -> Tensor:
    """Per-sample weighted mean of values [B, L] under weight [B, L] -> [B]; 0 for a row
    whose weights are all zero."""
    w = weight.to(values.dtype)
    total = w.sum(1)  # [B]
    return (w * values).sum(1) / torch.where(total > 0, total, torch.ones_like(total))


def per_sample_mean(err: Tensor, patch_weight: Tensor | None, patch_size: int | None) -> Tensor:
    """err [B, ...] -> [B]: the mean over each sample, or with patch_weight [B, L] the
    weighted mean of its p x p patch means."""
    if patch_weight is None:
        return err.flatten(1).mean(1)
    return weighted_mean(patch_means(err, patch_size), patch_weight)


def edm_loss_ref(F: Tensor, x_noisy: Tensor, x0: Tensor, sigma: Tensor, sigma_data: float = 0.5,
                 patch_weight: Tensor | None = None, patch_size: int | None = None) -> Tensor:
    """Coefficients in fp32; D - x0 in F's dtype, written as the kernel computes it,
    c_skip (x_noisy - x0) - (1 - c_skip) x0 + c_out F, so that nothing cancels at small
    sigma (c_skip -> 1); squares and means in fp32."""
    acc = _coefficient_dtype(F)
    s = sigma.to(acc)
    denom = s * s + sigma_data**2  # [B]
    c_skip = (sigma_data**2 / denom).to(F.dtype)
    one_minus_c_skip = (s * s / denom).to(F.dtype)
    c_out = (s * sigma_data / denom.sqrt()).to(F.dtype)
    lam = denom / (s * sigma_data) ** 2  # [B]
    err = (_per_sample(c_skip, F) * (x_noisy - x0) - _per_sample(one_minus_c_skip, F) * x0
           + _per_sample(c_out, F) * F)  # [B, ...]: D - x0
    return lam * per_sample_mean(err.to(acc).square(), patch_weight, patch_size)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _precondition_fwd_kernel(
    x0_ptr,  # [B, N] clean sample
    noise_ptr,  # [B, N] noise, same dtype
    sigma_ptr,  # [B] fp32 noise level
    x_noisy_ptr,  # [B, N] out: x0 + sigma*noise
    x_in_ptr,  # [B, N] out: c_in(sigma) * x_noisy
    x_teacher_ptr,  # [B, N] out: c_in(sigma_min) * (x0 + sigma_min*noise); HAS_TEACHER only
    c_noise_ptr,  # [B] fp32 out: ln(sigma)/4, written by each row's first program
    N, sigma_data, sigma_min,  # elements per sample; fp32 scalars
    HAS_TEACHER: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    sigma = tl.load(sigma_ptr + row)
    c_in = tl.div_rn(1.0, tl.sqrt_rn(sigma * sigma + sigma_data * sigma_data))
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    offs = row.to(tl.int64) * N + cols
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    noise = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x_noisy = x0 + sigma * noise
    tl.store(x_noisy_ptr + offs, x_noisy.to(x_noisy_ptr.dtype.element_ty), mask=mask)
    tl.store(x_in_ptr + offs, (c_in * x_noisy).to(x_in_ptr.dtype.element_ty), mask=mask)
    if HAS_TEACHER:
        c_in_t = tl.div_rn(1.0, tl.sqrt_rn(sigma_min * sigma_min + sigma_data * sigma_data))
        x_teacher = c_in_t * (x0 + sigma_min * noise)
        tl.store(x_teacher_ptr + offs, x_teacher.to(x_teacher_ptr.dtype.element_ty), mask=mask)
    if chunk == 0:
        tl.store(c_noise_ptr + row, tl.log(sigma) * 0.25)


@triton.jit
def _precondition_bwd_kernel(
    g_noisy_ptr,  # [B, N] grad of x_noisy; HAS_G_NOISY only
    g_in_ptr,  # [B, N] grad of x_in; HAS_G_IN only
    g_teacher_ptr,  # [B, N] grad of x_in_teacher; HAS_G_TEACHER only
    x0_ptr,  # [B, N] clean sample; NEED_DSIGMA only
    noise_ptr,  # [B, N] noise; NEED_DSIGMA only
    sigma_ptr,  # [B] fp32
    dx0_ptr,  # [B, N] out; WRITE_DX0 only
    dnoise_ptr,  # [B, N] out; WRITE_DNOISE only
    dsigma_part_ptr,  # [B, n_chunks] fp32 out: this program's share of dL/dsigma
    N, n_chunks, sigma_data, sigma_min,
    HAS_G_NOISY: tl.constexpr, HAS_G_IN: tl.constexpr, HAS_G_TEACHER: tl.constexpr,
    WRITE_DX0: tl.constexpr, WRITE_DNOISE: tl.constexpr, NEED_DSIGMA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    sigma = tl.load(sigma_ptr + row)
    c_in = tl.div_rn(1.0, tl.sqrt_rn(sigma * sigma + sigma_data * sigma_data))
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    offs = row.to(tl.int64) * N + cols
    # g_x: the gradient reaching x_noisy (directly and through x_in)
    g_x = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_G_NOISY:
        g_x += tl.load(g_noisy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_G_IN:
        g_in = tl.load(g_in_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g_x += c_in * g_in
    dx0 = g_x
    dnoise = sigma * g_x
    if HAS_G_TEACHER:
        c_in_t = tl.div_rn(1.0, tl.sqrt_rn(sigma_min * sigma_min + sigma_data * sigma_data))
        g_t = c_in_t * tl.load(g_teacher_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx0 += g_t
        dnoise += sigma_min * g_t
    if WRITE_DX0:
        tl.store(dx0_ptr + offs, dx0.to(dx0_ptr.dtype.element_ty), mask=mask)
    if WRITE_DNOISE:
        tl.store(dnoise_ptr + offs, dnoise.to(dnoise_ptr.dtype.element_ty), mask=mask)
    if NEED_DSIGMA:
        # d x_noisy/dsigma = noise; d c_in/dsigma = -sigma * c_in^3
        noise = tl.load(noise_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        term = noise * g_x
        if HAS_G_IN:
            x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            term -= (sigma * c_in * c_in * c_in) * (x0 + sigma * noise) * g_in
        tl.store(dsigma_part_ptr + row * n_chunks + chunk, tl.sum(term, axis=0))


@triton.jit
def _loss_coefficients(sigma, sigma_data):
    """Per-sample fp32 scalars: c_skip, 1 - c_skip, c_out, lambda, sigma^2 + sd^2."""
    sd2 = sigma_data * sigma_data
    denom = sigma * sigma + sd2
    c_skip = tl.div_rn(sd2, denom)
    one_minus_c_skip = tl.div_rn(sigma * sigma, denom)
    c_out = tl.div_rn(sigma * sigma_data, tl.sqrt_rn(denom))
    s_sd = sigma * sigma_data
    lam = tl.div_rn(denom, s_sd * s_sd)
    return c_skip, one_minus_c_skip, c_out, lam, denom


@triton.jit
def _element_weights(weight_ptr, row, cols, mask, HW, W, WP, L, inv_elems,
                     HAS_WEIGHT: tl.constexpr, P: tl.constexpr, L_BLOCK: tl.constexpr):
    """Each element's share of the per-sample mean: inv_elems (= 1/N) without weights, or
    w[row, patch] / (sum_l w[row, l] * C*P*P) with them (inv_elems = 1/(C*P*P))."""
    if HAS_WEIGHT:
        w_row = weight_ptr + row.to(tl.int64) * L
        acc = tl.zeros([L_BLOCK], dtype=tl.float32)
        for start in range(0, L, L_BLOCK):
            idx = start + tl.arange(0, L_BLOCK)
            acc += tl.load(w_row + idx, mask=idx < L, other=0.0).to(tl.float32)
        total = tl.sum(acc, axis=0)
        safe_total = tl.where(total > 0, total, 1.0)
        scale = tl.where(total > 0, tl.div_rn(inv_elems, safe_total), 0.0)
        hw = cols % HW
        h = hw // W
        patch = (h // P) * WP + (hw - h * W) // P
        w = tl.load(w_row + patch, mask=mask, other=0.0).to(tl.float32)
        return w * scale
    else:
        return tl.full([cols.shape[0]], 1.0, tl.float32) * inv_elems


@triton.jit
def _load_residual(f_ptr, x_noisy_ptr, x0_ptr, offs, mask, c_skip, one_minus_c_skip, c_out):
    """F, x_noisy, x0 in fp32 and r = D - x0 (0 where masked), written to keep precision as
    c_skip -> 1: c_skip*(x_noisy - x0) - (1 - c_skip)*x0 + c_out*F."""
    f = tl.load(f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x_noisy = tl.load(x_noisy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return f, x_noisy, c_skip * (x_noisy - x0) - one_minus_c_skip * x0 + c_out * f


@triton.jit
def _loss_fwd_kernel(
    f_ptr,  # [B, N] network output F
    x_noisy_ptr,  # [B, N]
    x0_ptr,  # [B, N]
    sigma_ptr,  # [B] fp32
    weight_ptr,  # [B, L] patch weights (any float); HAS_WEIGHT only
    partial_ptr,  # [B, n_chunks] fp32 out: lambda * this program's weighted sum of (D - x0)^2
    N, n_chunks,
    HW, W, WP, L,  # H*W, W, W//P, patches per sample (HAS_WEIGHT only)
    inv_elems, sigma_data,  # 1/N, or 1/(C*P*P) with weights
    HAS_WEIGHT: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr, L_BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    sigma = tl.load(sigma_ptr + row)
    c_skip, one_minus_c_skip, c_out, lam, _ = _loss_coefficients(sigma, sigma_data)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    offs = row.to(tl.int64) * N + cols
    _, _, r = _load_residual(f_ptr, x_noisy_ptr, x0_ptr, offs, mask, c_skip, one_minus_c_skip,
                             c_out)
    coef = _element_weights(weight_ptr, row, cols, mask, HW, W, WP, L, inv_elems,
                            HAS_WEIGHT, P, L_BLOCK)
    tl.store(partial_ptr + row * n_chunks + chunk, lam * tl.sum(coef * r * r, axis=0))


@triton.jit
def _loss_bwd_kernel(
    grad_ptr,  # [B] fp32 upstream gradient of the loss
    f_ptr,  # [B, N]
    x_noisy_ptr,  # [B, N]
    x0_ptr,  # [B, N]
    sigma_ptr,  # [B] fp32
    weight_ptr,  # [B, L] patch weights; HAS_WEIGHT only
    df_ptr,  # [B, N] out; WRITE_DF only
    dx_noisy_ptr,  # [B, N] out; WRITE_DXN only
    dx0_ptr,  # [B, N] out; WRITE_DX0 only
    dsigma_part_ptr,  # [B, n_chunks] fp32 out: sum coef*r*(dc_skip*x_noisy + dc_out*F)
    N, n_chunks, HW, W, WP, L, inv_elems, sigma_data,  # as in _loss_fwd_kernel
    HAS_WEIGHT: tl.constexpr, P: tl.constexpr,
    WRITE_DF: tl.constexpr, WRITE_DXN: tl.constexpr, WRITE_DX0: tl.constexpr,
    NEED_DSIGMA: tl.constexpr, BLOCK: tl.constexpr, L_BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    sigma = tl.load(sigma_ptr + row)
    g = tl.load(grad_ptr + row)
    c_skip, one_minus_c_skip, c_out, lam, denom = _loss_coefficients(sigma, sigma_data)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    offs = row.to(tl.int64) * N + cols
    f, x_noisy, r = _load_residual(f_ptr, x_noisy_ptr, x0_ptr, offs, mask, c_skip,
                                   one_minus_c_skip, c_out)
    coef = _element_weights(weight_ptr, row, cols, mask, HW, W, WP, L, inv_elems,
                            HAS_WEIGHT, P, L_BLOCK)
    t = (2.0 * g * lam) * coef * r  # dloss/dD
    if WRITE_DF:
        tl.store(df_ptr + offs, (c_out * t).to(df_ptr.dtype.element_ty), mask=mask)
    if WRITE_DXN:
        tl.store(dx_noisy_ptr + offs, (c_skip * t).to(dx_noisy_ptr.dtype.element_ty), mask=mask)
    if WRITE_DX0:
        tl.store(dx0_ptr + offs, (-t).to(dx0_ptr.dtype.element_ty), mask=mask)
    if NEED_DSIGMA:
        d_c_skip = tl.div_rn(-2.0 * sigma * c_skip, denom)
        sd = sigma_data
        d_c_out = tl.div_rn(sd * sd * sd, denom * tl.sqrt_rn(denom))
        part = tl.sum(coef * r * (d_c_skip * x_noisy + d_c_out * f), axis=0)
        tl.store(dsigma_part_ptr + row * n_chunks + chunk, part)


# ----------------------------------------------------------------------------- launchers

_GPU_ELEMENTWISE_BLOCK = 1024  # 8 elements per thread at 4 warps: 16-byte bf16 accesses
_GPU_REDUCTION_BLOCK = 4096  # an XL/2 latent (4x32x32) per program: one launch, no 2nd stage
_INTERPRETER_BLOCK = 8192  # ~1 ms per program under the interpreter: few, big programs


def _launch_config(n: int, gpu_block: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of n elements."""
    cap = _INTERPRETER_BLOCK if _runtime.interpreter_active() else gpu_block
    block = max(16, min(triton.next_power_of_2(n), cap))
    return block, (8 if block >= 4096 else 4)


def _flat(t: Tensor) -> Tensor:
    """[B, ...] -> contiguous [B, N] (grads may arrive expanded, with stride 0)."""
    return t.contiguous().view(t.shape[0], -1)


def _on_device(t: Tensor) -> torch.cuda.device | torch.device:
    return torch.cuda.device(t.device) if t.device.type == "cuda" else t.device


def _sum_partials(partial: Tensor) -> Tensor:
    """[B, chunks] fp32 -> [B]; a fixed-order torch reduction, skipped for one chunk."""
    return partial.view(-1) if partial.shape[1] == 1 else partial.sum(dim=1)


def _maybe_empty(needed: bool, like: Tensor) -> Tensor:
    """An output shaped like `like`, or a 0-element stand-in when it is not needed."""
    return _runtime.empty(like.shape if needed else (0,), like.dtype, like.device)


def _flat_or(t: Tensor | None, dummy: Tensor) -> Tensor:
    """A pointer argument: the [B, N] view of t, or `dummy` for a compiled-out operand."""
    return dummy if t is None else _flat(t)


def _precondition_fwd(x0: Tensor, noise: Tensor, sigma: Tensor, sigma_data: float,
                      sigma_min: float | None) -> list[Tensor]:
    x0_2d, noise_2d = _flat(x0), _flat(noise)  # [B, N]
    B, N = x0_2d.shape
    x_noisy = _runtime.empty(x0.shape, x0.dtype, x0.device)
    x_in = _runtime.empty(x0.shape, x0.dtype, x0.device)
    c_noise = _runtime.empty((B,), torch.float32, x0.device)
    outs = [x_noisy, x_in, c_noise]
    if sigma_min is not None:
        outs.append(_runtime.empty(x0.shape, x0.dtype, x0.device))
    block, warps = _launch_config(N, _GPU_ELEMENTWISE_BLOCK)
    with _on_device(x0):
        _precondition_fwd_kernel[(B, triton.cdiv(N, block))](
            x0_2d, noise_2d, sigma.contiguous(), x_noisy, x_in, outs[-1], c_noise, N,
            float(sigma_data), float(sigma_min or 0.0),
            HAS_TEACHER=sigma_min is not None, BLOCK=block, num_warps=warps)
    return outs


def _precondition_fwd_fake(x0, noise, sigma, sigma_data, sigma_min) -> list[Tensor]:
    outs = [x0.new_empty(x0.shape), x0.new_empty(x0.shape), sigma.new_empty(x0.shape[:1])]
    return outs + ([x0.new_empty(x0.shape)] if sigma_min is not None else [])


_precondition_fwd_op = KernelOp("edm_precondition_fwd", _precondition_fwd, _precondition_fwd_fake)


def _precondition_bwd(g_noisy: Tensor | None, g_in: Tensor | None, g_teacher: Tensor | None,
                      x0: Tensor | None, noise: Tensor | None, sigma: Tensor,
                      sigma_data: float, sigma_min: float | None, need_dx0: bool,
                      need_dnoise: bool, need_dsigma: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dx0, dnoise, dsigma from the element outputs); unneeded ones are empty. At least
    one of the three grads is given; x0 and noise are needed only for dsigma."""
    like = next(g for g in (g_noisy, g_in, g_teacher) if g is not None)
    B, N = like.shape[0], like[0].numel()
    dx0, dnoise = _maybe_empty(need_dx0, like), _maybe_empty(need_dnoise, like)
    block, warps = _launch_config(N, _GPU_REDUCTION_BLOCK if need_dsigma else
                                  _GPU_ELEMENTWISE_BLOCK)
    chunks = triton.cdiv(N, block)
    partial = _runtime.empty((B, chunks) if need_dsigma else (0,), torch.float32, like.device)
    with _on_device(like):
        _precondition_bwd_kernel[(B, chunks)](
            _flat_or(g_noisy, sigma), _flat_or(g_in, sigma), _flat_or(g_teacher, sigma),
            _flat_or(x0 if need_dsigma else None, sigma),
            _flat_or(noise if need_dsigma else None, sigma), sigma.contiguous(), dx0, dnoise,
            partial, N, chunks, float(sigma_data), float(sigma_min or 0.0),
            HAS_G_NOISY=g_noisy is not None, HAS_G_IN=g_in is not None,
            HAS_G_TEACHER=g_teacher is not None, WRITE_DX0=need_dx0, WRITE_DNOISE=need_dnoise,
            NEED_DSIGMA=need_dsigma, BLOCK=block, num_warps=warps)
    dsigma = _sum_partials(partial) if need_dsigma else partial
    return dx0, dnoise, dsigma


def _precondition_bwd_fake(g_noisy, g_in, g_teacher, x0, noise, sigma, sigma_data, sigma_min,
                           need_dx0, need_dnoise, need_dsigma) -> tuple[Tensor, Tensor, Tensor]:
    like = next(g for g in (g_noisy, g_in, g_teacher) if g is not None)
    return (like.new_empty(like.shape if need_dx0 else (0,)),
            like.new_empty(like.shape if need_dnoise else (0,)),
            sigma.new_empty(like.shape[:1] if need_dsigma else (0,)))


_precondition_bwd_op = KernelOp("edm_precondition_bwd", _precondition_bwd, _precondition_bwd_fake)


def _loss_launch_args(F: Tensor, patch_weight: Tensor | None,
                      patch_size: int) -> tuple[list, dict]:
    """The kernels' (HW, W, WP, L, inv_elems) and constexprs, for F [B, C, H, W] with
    patches or any [B, ...] without."""
    if patch_weight is None:
        return [1, 1, 1, 1, 1.0 / F[0].numel()], dict(HAS_WEIGHT=False, P=1, L_BLOCK=16)
    _, C, H, W = F.shape
    p = patch_size
    length = (H // p) * (W // p)
    l_block = max(16, min(triton.next_power_of_2(length), 1024))
    return ([H * W, W, W // p, length, 1.0 / (C * p * p)],
            dict(HAS_WEIGHT=True, P=p, L_BLOCK=l_block))


def _loss_fwd(F: Tensor, x_noisy: Tensor, x0: Tensor, sigma: Tensor,
              patch_weight: Tensor | None, patch_size: int, sigma_data: float) -> Tensor:
    f_2d = _flat(F)  # [B, N]
    B, N = f_2d.shape
    block, warps = _launch_config(N, _GPU_REDUCTION_BLOCK)
    chunks = triton.cdiv(N, block)
    partial = _runtime.empty((B, chunks), torch.float32, F.device)
    geometry, flags = _loss_launch_args(F, patch_weight, patch_size)
    weight = patch_weight.contiguous() if patch_weight is not None else sigma
    with _on_device(F):
        _loss_fwd_kernel[(B, chunks)](
            f_2d, _flat(x_noisy), _flat(x0), sigma.contiguous(), weight, partial, N, chunks,
            *geometry, float(sigma_data), **flags, BLOCK=block, num_warps=warps)
    return _sum_partials(partial)


def _loss_fwd_fake(F, x_noisy, x0, sigma, patch_weight, patch_size, sigma_data) -> Tensor:
    return F.new_empty(F.shape[:1], dtype=torch.float32)


_loss_fwd_op = KernelOp("edm_loss_fwd", _loss_fwd, _loss_fwd_fake)


def _loss_bwd(grad: Tensor, F: Tensor, x_noisy: Tensor, x0: Tensor, sigma: Tensor,
              patch_weight: Tensor | None, loss: Tensor | None, patch_size: int,
              sigma_data: float, need_dF: bool, need_dx_noisy: bool, need_dx0: bool,
              need_dsigma: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dF, dx_noisy, dx0, dsigma); unneeded ones are empty. `loss` is needed for dsigma."""
    f_2d = _flat(F)
    B, N = f_2d.shape
    block, warps = _launch_config(N, _GPU_REDUCTION_BLOCK if need_dsigma else
                                  _GPU_ELEMENTWISE_BLOCK)
    chunks = triton.cdiv(N, block)
    dF, dxn, dx0 = (_maybe_empty(need, F) for need in (need_dF, need_dx_noisy, need_dx0))
    partial = _runtime.empty((B, chunks) if need_dsigma else (0,), torch.float32, F.device)
    geometry, flags = _loss_launch_args(F, patch_weight, patch_size)
    weight = patch_weight.contiguous() if patch_weight is not None else sigma
    with _on_device(F):
        _loss_bwd_kernel[(B, chunks)](
            grad.contiguous().float(), f_2d, _flat(x_noisy), _flat(x0), sigma.contiguous(),
            weight, dF, dxn, dx0, partial, N, chunks,
            *geometry, float(sigma_data), **flags, WRITE_DF=need_dF, WRITE_DXN=need_dx_noisy,
            WRITE_DX0=need_dx0, NEED_DSIGMA=need_dsigma, BLOCK=block, num_warps=warps)
    if not need_dsigma:
        return dF, dxn, dx0, partial
    # dloss/dsigma = g * (lambda'/lambda * loss + 2 * lambda * sum coef*r*dD/dsigma)
    s = sigma.float()
    sd2 = sigma_data**2
    denom = s * s + sd2
    lam = denom / (s * s * sd2)
    dsigma = grad * (-2.0 * sd2 / (s * denom) * loss + 2.0 * lam * _sum_partials(partial))
    return dF, dxn, dx0, dsigma


def _loss_bwd_fake(grad, F, x_noisy, x0, sigma, patch_weight, loss, patch_size, sigma_data,
                   need_dF, need_dx_noisy, need_dx0,
                   need_dsigma) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    needs = (need_dF, need_dx_noisy, need_dx0)
    return (*(F.new_empty(F.shape if need else (0,)) for need in needs),
            sigma.new_empty(F.shape[:1] if need_dsigma else (0,)))


_loss_bwd_op = KernelOp("edm_loss_bwd", _loss_bwd, _loss_bwd_fake)


# ----------------------------------------------------------------------------- autograd


class EDMPreconditionFunction(torch.autograd.Function):
    """(x0, noise, sigma fp32 [B], sigma_data, sigma_min) -> (x_noisy, x_in, c_noise[, x_in_t])."""

    @staticmethod
    def forward(ctx, x0: Tensor, noise: Tensor, sigma: Tensor, sigma_data: float,
                sigma_min: float | None) -> tuple[Tensor, ...]:
        outs = _precondition_fwd_op(x0, noise, sigma, sigma_data,
                     sigma_min)
        need_dsigma = ctx.needs_input_grad[2]
        ctx.save_for_backward(x0 if need_dsigma else None, noise if need_dsigma else None, sigma)
        ctx.sigma_data, ctx.sigma_min = sigma_data, sigma_min
        if not need_dsigma:
            ctx.mark_non_differentiable(outs[2])
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, g_noisy: Tensor | None, g_in: Tensor | None, g_c_noise: Tensor | None,
                 g_teacher: Tensor | None = None) -> tuple[Tensor | None, ...]:
        x0, noise, sigma = ctx.saved_tensors
        need_dx0, need_dnoise, need_dsigma = ctx.needs_input_grad[:3]
        dx0 = dnoise = dsigma = None
        has_element_grads = g_noisy is not None or g_in is not None or g_teacher is not None
        if has_element_grads and (need_dx0 or need_dnoise or need_dsigma):
            dx0, dnoise, dsigma = _precondition_bwd_op(
                g_noisy, g_in, g_teacher, x0, noise,
                sigma, ctx.sigma_data, ctx.sigma_min, need_dx0, need_dnoise, need_dsigma)
        if need_dsigma:
            if g_c_noise is not None:  # c_noise = ln(sigma)/4
                from_c_noise = g_c_noise.float() / (4.0 * sigma)
                dsigma = from_c_noise if dsigma is None else dsigma + from_c_noise
            if dsigma is None:
                dsigma = torch.zeros_like(sigma)
        return (dx0 if need_dx0 else None, dnoise if need_dnoise else None,
                dsigma if need_dsigma else None, None, None)


class EDMLossFunction(torch.autograd.Function):
    """(F, x_noisy, x0, sigma fp32 [B], patch_weight|None, patch_size (0: none), sigma_data)
    -> loss [B] fp32. patch_weight gets no gradient."""

    @staticmethod
    def forward(ctx, F: Tensor, x_noisy: Tensor, x0: Tensor, sigma: Tensor,
                patch_weight: Tensor | None, patch_size: int, sigma_data: float) -> Tensor:
        loss = _loss_fwd_op(F, x_noisy, x0, sigma, patch_weight,
                     patch_size, sigma_data)
        need_dsigma = ctx.needs_input_grad[3]
        ctx.save_for_backward(F, x_noisy, x0, sigma, patch_weight, loss if need_dsigma else None)
        ctx.patch_size, ctx.sigma_data = patch_size, sigma_data
        return loss

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        F, x_noisy, x0, sigma, patch_weight, loss = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        if not any(need):
            return (None,) * 7
        grads = _loss_bwd_op(grad, F, x_noisy, x0, sigma, patch_weight,
                      loss, ctx.patch_size, ctx.sigma_data, *need)
        return (*(g if n else None for g, n in zip(grads, need, strict=True)), None, None, None)


# ----------------------------------------------------------------------------- public ops


def _check_sigma(sigma: object, batch: int) -> Tensor:
    if not isinstance(sigma, Tensor):
        raise TypeError(f"sigma must be a torch.Tensor, got {type(sigma).__name__}")
    if not sigma.is_floating_point():
        raise TypeError(f"sigma must be a floating-point tensor, got {sigma.dtype}")
    if sigma.dim() != 1 or sigma.shape[0] != batch:
        raise ValueError(f"sigma must have shape [B] = [{batch}], got {list(sigma.shape)}")
    return sigma


def _check_positive_scalar(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return float(value)


def _check_values(sigma: Tensor, patch_weight: Tensor | None) -> None:
    """sigma > 0 and finite, patch_weight >= 0: one host sync; skipped while compiling."""
    if torch.compiler.is_compiling():
        return
    flags = [~((sigma > 0) & torch.isfinite(sigma))]
    if patch_weight is not None:
        flags.append(~(patch_weight >= 0))
    bad = torch.stack([f.any() for f in flags]).tolist()
    if bad[0]:
        raise ValueError("sigma must be positive and finite in every sample")
    if len(bad) > 1 and bad[1]:
        raise ValueError("patch_weight must be nonnegative (and not NaN)")


def _check_samples(**tensors: Tensor) -> torch.Size:
    """Float tensors of one shape [B, ...] (non-empty) and dtype; returns the shape."""
    for name, t in tensors.items():
        check_float(name, t)
    (first, ref), *rest = tensors.items()
    if ref.dim() < 1 or ref.numel() == 0:
        raise ValueError(f"{first} must be a non-empty [B, ...] tensor, got {list(ref.shape)}")
    for name, t in rest:
        if t.shape != ref.shape:
            raise ValueError(f"{name} must have the shape of {first} {list(ref.shape)}, "
                             f"got {list(t.shape)}")
    check_same_dtype(**tensors)
    return ref.shape


def _check_patches(shape: torch.Size, patch_weight: object, patch_size: object) -> None:
    """Both or neither; images [B, C, H, W] with p | H, W; a float [B, L] constant weight."""
    if (patch_weight is None) != (patch_size is None):
        raise ValueError("patch_weight and patch_size must be given together, got "
                         f"patch_weight={'None' if patch_weight is None else 'a tensor'}, "
                         f"patch_size={patch_size!r}")
    if patch_weight is None:
        return
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    if len(shape) != 4:
        raise ValueError(f"F must be an image batch [B, C, H, W] when patch_size is given, "
                         f"got {list(shape)}")
    B, _, H, W = shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"patch_size {patch_size} must divide H={H} and W={W}")
    if not isinstance(patch_weight, Tensor) or not patch_weight.is_floating_point():
        kind = patch_weight.dtype if isinstance(patch_weight, Tensor) else type(patch_weight)
        raise TypeError(f"patch_weight must be a floating-point tensor, got {kind}")
    length = (H // patch_size) * (W // patch_size)
    if tuple(patch_weight.shape) != (B, length):
        raise ValueError(f"patch_weight must have shape [B, L] = [{B}, {length}] for "
                         f"patch_size {patch_size}, got {list(patch_weight.shape)}")
    if patch_weight.requires_grad:
        raise ValueError("patch_weight must not require grad: it is treated as a constant "
                         "mask (detach it)")


def edm_precondition(x0: Tensor, noise: Tensor, sigma: Tensor, sigma_min: float | None = None,
                     sigma_data: float = 0.5, check: bool = True) -> tuple[Tensor, ...]:
    """(x_noisy, x_in, c_noise), plus x_in_teacher at sigma_min when it is given.
    x0, noise: [B, ...] fp32/fp16/bf16; sigma: [B] > 0. `check=False` skips the host sync
    that checks sigma's values."""
    shape = _check_samples(x0=x0, noise=noise)
    _check_sigma(sigma, shape[0])
    check_same_device(x0=x0, noise=noise, sigma=sigma)
    sigma_data = _check_positive_scalar("sigma_data", sigma_data)
    if sigma_min is not None:
        sigma_min = _check_positive_scalar("sigma_min", sigma_min)
    if check:
        _check_values(sigma, None)
    if _runtime.use_triton(x0, noise, sigma):
        if needs_autograd(x0, noise, sigma):
            return EDMPreconditionFunction.apply(x0, noise, sigma.float(), sigma_data, sigma_min)
        return tuple(_precondition_fwd_op(x0, noise, sigma.float(),
                           sigma_data, sigma_min))
    return edm_precondition_ref(x0, noise, sigma, sigma_min, sigma_data)


def edm_loss(F: Tensor, x_noisy: Tensor, x0: Tensor, sigma: Tensor, sigma_data: float = 0.5,
             patch_weight: Tensor | None = None, patch_size: int | None = None,
             check: bool = True) -> Tensor:
    """Per-sample EDM loss [B] fp32, optionally a weighted mean over p x p patches.
    F, x_noisy, x0: [B, ...] (images [B, C, H, W] with patches); sigma: [B] > 0;
    patch_weight: [B, (H/p)*(W/p)] >= 0, row-major patches, no gradient."""
    shape = _check_samples(F=F, x_noisy=x_noisy, x0=x0)
    _check_sigma(sigma, shape[0])
    sigma_data = _check_positive_scalar("sigma_data", sigma_data)
    _check_patches(shape, patch_weight, patch_size)
    check_same_device(F=F, x_noisy=x_noisy, x0=x0, sigma=sigma, patch_weight=patch_weight)
    if check:
        _check_values(sigma, patch_weight)
    if _runtime.use_triton(F, x_noisy, x0, sigma):
        if needs_autograd(F, x_noisy, x0, sigma):
            return EDMLossFunction.apply(F, x_noisy, x0, sigma.float(), patch_weight,
                                         patch_size or 0, sigma_data)
        return _loss_fwd_op(F, x_noisy, x0, sigma.float(), patch_weight,
                     patch_size or 0, sigma_data)
    return edm_loss_ref(F, x_noisy, x0, sigma, sigma_data, patch_weight, patch_size)
