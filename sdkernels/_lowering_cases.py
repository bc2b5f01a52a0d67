"""The lowering cases of every kernel family: each kernel at the specialisations a GPU
launch would use (SD-DiT-XL/2 shapes, the launchers' GPU block sizes, dtypes), compiled
for sm_80 and sm_90 by `_lowering.main` (`python -m sdkernels`) in CI.

They live here, apart from the op files, so that each op file is about its math, its
kernels and their launchers; a case reaches into its family's private kernels and launch
helpers on purpose, since it must lower exactly what the launcher runs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import triton
import triton.language as tl

from sdkernels import adaln, edm, optim, tokens


@dataclass(frozen=True)
class LoweringCase:
    """One kernel at one specialisation: `signature` maps every argument to a Triton type
    ("*bf16", "i32", "fp32", or "constexpr"), and `constexprs` gives the constexpr values."""

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    # Integer arguments whose launch values are multiples of 16 (e.g. D = 1152): a real
    # launch specialises on that, so the lowering should too.
    divisible_ints: tuple[str, ...] = ()
    # Launch values of integer arguments (e.g. {"D": 1152, "K": 205}); each is specialised
    # by Triton's own launch rule (see `specialise`). Names without a value stay plain ints.
    launch_ints: dict[str, int] = field(default_factory=dict)

# ----------------------------------------------------------------------------- adaln
_ADALN_FP32_POINTERS = ("MEAN", "RSTD", "PARTIAL")
_ADALN_RESIDUAL_POINTERS = ("X", "X_OUT", "DX", "DX_OUT")  # the residual stream's dtype
_ADALN_INT_ARGS = ("T", "D", "ROWS_PER_CHUNK", "N_CHUNKS", "VEC_STRIDE")
# D = 1152 and VEC_STRIDE = B * N_CHUNKS * D are multiples of 16 at XL/2, and a launch
# specialises on that (T is 205 or 256 and ROWS_PER_CHUNK a multiple of BLOCK_M: left out).
_ADALN_DIVISIBLE_INTS = ("D", "VEC_STRIDE")
# (tag, compute pointer type, residual pointer type): bf16 throughout, the bf16-autocast
# training path (fp32 residual stream), and fp32 throughout.
_ADALN_DTYPE_VARIANTS = (("", "*bf16", "*bf16"), (".mixed", "*bf16", "*fp32"),
                   (".fp32", "*fp32", "*fp32"))


def _adaln_signature(kernel: Any, cdtype: str, xdtype: str) -> dict[str, str]:
    """Triton types of a kernel's arguments: capitalised pointers hold the compute dtype,
    the residual stream's (X, X_OUT and their grads) or fp32 statistics."""
    sig = {}
    for name, param in inspect.signature(kernel.fn).parameters.items():
        if param.annotation is tl.constexpr:
            sig[name] = "constexpr"
        elif name in _ADALN_INT_ARGS:
            sig[name] = "i32"
        elif name == "eps":
            sig[name] = "fp32"
        elif name in _ADALN_FP32_POINTERS:
            sig[name] = "*fp32"
        else:
            sig[name] = xdtype if name in _ADALN_RESIDUAL_POINTERS else cdtype
    return sig


def _adaln_case(name: str, kernel: Any, dtypes: tuple[str, str, str], constexprs: dict[str, Any],
          warps: int) -> LoweringCase:
    tag, cdtype, xdtype = dtypes
    divisible = tuple(n for n in _ADALN_DIVISIBLE_INTS if n in kernel.arg_names)
    return LoweringCase(f"adaln.{name}{tag}", kernel, _adaln_signature(kernel, cdtype, xdtype),
                        constexprs, warps, divisible)


def adaln_cases() -> list[LoweringCase]:
    """Every kernel at SD-DiT-XL/2 width (D=1152) with the GPU launch parameters, in bf16,
    mixed (fp32 residual stream, bf16 compute) and fp32; the backward flag variants that
    only skip loads lower once, in the mixed training dtypes."""
    block_d = triton.next_power_of_2(1152)
    block_m = max(1, adaln._GPU_TILE // block_d)
    warps = min(8, max(1, block_m * block_d // 256))
    tile = {"BLOCK_M": block_m, "BLOCK_D": block_d}
    both = {"HAS_DX_OUT": True, "HAS_DH": True, **tile}
    cases = []
    for dtypes in _ADALN_DTYPE_VARIANTS:
        cases += [
            _adaln_case("modulate_fwd", adaln._modulate_fwd_kernel, dtypes, tile, warps),
            _adaln_case("residual_gate_fwd", adaln._residual_fwd_kernel, dtypes, tile, warps),
            _adaln_case("modulate_bwd", adaln._modulate_bwd_kernel, dtypes, tile, warps),
            _adaln_case("residual_gate_bwd", adaln._residual_bwd_kernel, dtypes, both, warps),
            _adaln_case("sum_chunks", adaln._sum_chunks_kernel, dtypes, {"BLOCK_D": 512}, 4)]
    mixed = _ADALN_DTYPE_VARIANTS[1]
    for has_dx_out, has_dh, tag in ((False, True, "_h_only"), (True, False, "_x_out_only")):
        flags = {"HAS_DX_OUT": has_dx_out, "HAS_DH": has_dh, **tile}
        cases.append(_adaln_case(f"residual_gate_bwd{tag}", adaln._residual_bwd_kernel, mixed,
                                 flags, warps))
    return cases


# ----------------------------------------------------------------------------- tokens
def _tokens_case(name: str, kernel: Any, constexprs: dict, num_warps: int = 4,
                 **ptr_types: str) -> LoweringCase:
    """Pointers default to bf16 (name them in ptr_types otherwise), other args to i32."""
    sig = {a: ptr_types.get(a, "*bf16") if a.endswith("_ptr")
           else "constexpr" if a in constexprs else "i32" for a in kernel.arg_names}
    return LoweringCase(f"tokens.{name}", kernel, sig, constexprs, num_warps)


def tokens_cases() -> list[LoweringCase]:
    """Every kernel at SD-DiT-XL/2 shapes (L=256, K=205, D=1152, bf16) with the blocks the
    launchers pick on a GPU: every variant with int32 ids, one per kernel with int64."""
    L, K, D = 256, 205, 1152
    r, d = tokens._row_blocks(D, L, interp=False)
    pos_r, pos_d = tokens._pos_bwd_blocks(D, L, interp=False)
    rows = {"BLOCK_R": r, "BLOCK_D": d}
    looked_up = {**rows, "BLOCK_K": tokens._block_k(K, interp=False)}
    reduce_r, _ = tokens._row_blocks(D, L, False, tokens._REDUCE_TILE_ELEMS_GPU)
    reduce_blocks = {**looked_up, "BLOCK_R": reduce_r}
    cases: list[LoweringCase] = []
    for it in ("i32", "i64"):
        full = it == "i32"
        ids = {"ids_ptr": f"*{it}"}
        for has_pos in (False, True)[: 2 if full else 1]:
            cases.append(_tokens_case(f"gather.{it}{'.pos' * has_pos}", tokens._gather_kernel,
                                      {**rows, "HAS_POS": has_pos}, **ids))
        for fill in (0, 1, 2) if full else (2,):
            cases.append(_tokens_case(f"scatter.fill{fill}.{it}", tokens._scatter_kernel,
                                      {**looked_up, "FILL": fill}, **ids))
        for fill_grad, keep in ((1, True), (2, True), (2, False)) if full else ((1, True),):
            blocks, warps = ((reduce_blocks, tokens._REDUCE_WARPS) if fill_grad == 1
                             else (looked_up, 4))
            cases.append(_tokens_case(f"scatter_bwd.fill{fill_grad}{'.keep' * keep}.{it}",
                                      tokens._scatter_bwd_kernel,
                                      {**blocks, "WRITE_KEEP": keep, "FILL_GRAD": fill_grad},
                                      warps, partial_ptr="*fp32", **ids))
        for write_dx in (True, False) if full else (True,):
            cases.append(_tokens_case(f"gather_bwd_pos{'.dx' * write_dx}.{it}",
                                      tokens._gather_bwd_pos_kernel,
                                      {**looked_up, "BLOCK_R": pos_r, "BLOCK_D": pos_d,
                                       "WRITE_DX": write_dx}, **ids))
    cases.append(_tokens_case("sum_partials", tokens._sum_partials_kernel,
                              {"BLOCK_P": 128, "BLOCK_D": 32}, partial_ptr="*fp32"))
    return cases


# ----------------------------------------------------------------------------- edm
_EDM_FP32_POINTERS = {"sigma_ptr", "c_noise_ptr", "dsigma_part_ptr", "partial_ptr",
                      "weight_ptr", "grad_ptr"}
_EDM_FP32_SCALARS = {"sigma_data", "sigma_min", "inv_elems"}


def _edm_signature(kernel: Any) -> dict[str, str]:
    """Triton types of every argument with bf16 tensors (per-sample buffers are fp32)."""
    def kind(name: str, is_constexpr: bool) -> str:
        if is_constexpr:
            return "constexpr"
        if name.endswith("_ptr"):
            return "*fp32" if name in _EDM_FP32_POINTERS else "*bf16"
        return "fp32" if name in _EDM_FP32_SCALARS else "i32"

    return {p.name: kind(p.name, p.is_constexpr) for p in kernel.params}


def edm_cases() -> list[LoweringCase]:
    """Every kernel at SD-DiT-XL/2 latents (4 x 32 x 32, patch 2, L = 256) in bf16, with
    the block sizes the launchers pick on a GPU."""
    n = 4 * 32 * 32
    elementwise = dict(BLOCK=min(n, edm._GPU_ELEMENTWISE_BLOCK))
    reduction = dict(BLOCK=min(n, edm._GPU_REDUCTION_BLOCK))
    pre_bwd = dict(HAS_G_NOISY=True, HAS_G_IN=True, HAS_G_TEACHER=True, WRITE_DX0=True,
                   WRITE_DNOISE=True)
    patch = dict(HAS_WEIGHT=True, P=2, L_BLOCK=256)
    plain = dict(HAS_WEIGHT=False, P=1, L_BLOCK=16)
    train_bwd = dict(WRITE_DF=True, WRITE_DXN=False, WRITE_DX0=False, NEED_DSIGMA=False)
    all_bwd = dict(WRITE_DF=True, WRITE_DXN=True, WRITE_DX0=True, NEED_DSIGMA=True)
    specs = [
        ("precondition_fwd", edm._precondition_fwd_kernel, dict(HAS_TEACHER=False, **elementwise)),
        ("precondition_fwd.teacher", edm._precondition_fwd_kernel,
         dict(HAS_TEACHER=True, **elementwise)),
        ("precondition_bwd", edm._precondition_bwd_kernel,
         dict(**pre_bwd, NEED_DSIGMA=False, **elementwise)),
        ("precondition_bwd.dsigma", edm._precondition_bwd_kernel,
         dict(**pre_bwd, NEED_DSIGMA=True, **reduction)),
        ("loss_fwd", edm._loss_fwd_kernel, dict(**plain, **reduction)),
        ("loss_fwd.patch2", edm._loss_fwd_kernel, dict(**patch, **reduction)),
        ("loss_bwd", edm._loss_bwd_kernel, dict(**plain, **train_bwd, **elementwise)),
        ("loss_bwd.patch2", edm._loss_bwd_kernel, dict(**patch, **train_bwd, **elementwise)),
        ("loss_bwd.patch2.all", edm._loss_bwd_kernel, dict(**patch, **all_bwd, **reduction)),
    ]
    return [LoweringCase(f"edm.{name}", kernel, _edm_signature(kernel), constexprs,
                         num_warps=edm._launch_config(constexprs["BLOCK"], constexprs["BLOCK"])[1])
            for name, kernel, constexprs in specs]


# ----------------------------------------------------------------------------- optim
def optim_cases() -> list[LoweringCase]:
    """The kernel variants SD-DiT training launches, at the GPU chunk and block sizes."""
    sig: dict[str, str] = {"ADDR": "*i64", "GRADS": "*i64", "NUMEL": "*i64", "CHUNKS": "*i32",
                           "STEPS": "*fp32", "FOUND_INF": "*fp32", "lr": "fp64",
                           "log_beta1": "fp64", "log_beta2": "fp64"}
    sig |= {n: "fp32" for n in ("decay", "beta2", "eps", "w_m", "w_v", "w_teacher", "w_ema")}
    names = ("ADAM", "TEACHER", "EMA", "SHADOW", "HAS_FOUND_INF", "CHUNK", "BLOCK")
    sig |= {n: "constexpr" for n in names}
    variants: list[tuple[str, dict[str, Any]]] = [
        ("all", dict(ADAM=True, TEACHER=True, EMA=True, SHADOW=True, HAS_FOUND_INF=True)),
        ("ema", dict(ADAM=True, TEACHER=False, EMA=True, SHADOW=False, HAS_FOUND_INF=True)),
        ("teacher", dict(ADAM=True, TEACHER=True, EMA=False, SHADOW=True, HAS_FOUND_INF=True)),
        ("adam", dict(ADAM=True, TEACHER=False, EMA=False, SHADOW=False, HAS_FOUND_INF=False)),
        ("no_grad", dict(ADAM=False, TEACHER=True, EMA=True, SHADOW=False, HAS_FOUND_INF=True)),
    ]
    return [LoweringCase(f"optim.adamw_ema.{tag}", optim._adamw_ema_kernel, sig,
                         {**flags, "CHUNK": optim._GPU_CHUNK, "BLOCK": optim._GPU_BLOCK}, 4)
            for tag, flags in variants]


def all_cases() -> list[LoweringCase]:
    return adaln_cases() + tokens_cases() + edm_cases() + optim_cases()
