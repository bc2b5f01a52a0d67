"""adaLN kernels at SD-DiT-XL/2 training shapes: B=32, D=1152, T=256 tokens (all patches)
and T=205 (the kept 80% at mask ratio 0.2), in two layouts:
- "mixed": the bf16-autocast training path. The residual stream x / x_out (and its
  grads) is fp32; the branch output y, gate, shift, scale, h and their grads are bf16.
- "bf16": every tensor bf16 (a pure-bf16 model).

Minimal bytes: forward reads every input once and writes every output once; backward
reads the output grads and the tensors the math needs (x or x_out, y, the [B, D]
vectors) and writes every input grad. Saved fp32 row stats are not counted.
"""

from __future__ import annotations

import torch

from bench._harness import Inputs, KernelCase, nbytes
from sdkernels.adaln import (
    adaln_modulate,
    adaln_modulate_ref,
    residual_gate_adaln,
    residual_gate_adaln_ref,
)

B, D = 32, 1152
TOKENS = (256, 205)
# layout -> (residual stream dtype, compute dtype)
LAYOUTS = {"mixed": (torch.float32, torch.bfloat16), "bf16": (torch.bfloat16, torch.bfloat16)}


def _randn(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype,
           scale: float = 1.0) -> torch.Tensor:
    t = torch.randn(shape, device=device, dtype=torch.float32) * scale
    return t.to(dtype).requires_grad_(True)


def _modulate_inputs(T: int, xdt: torch.dtype, cdt: torch.dtype):
    def make(device: torch.device) -> Inputs:
        return {"x": _randn((B, T, D), device, xdt), "shift": _randn((B, D), device, cdt),
                "scale": _randn((B, D), device, cdt, 0.5)}

    return make


def _residual_inputs(T: int, xdt: torch.dtype, cdt: torch.dtype):
    def make(device: torch.device) -> Inputs:
        return {"x": _randn((B, T, D), device, xdt), "y": _randn((B, T, D), device, cdt),
                "gate": _randn((B, D), device, cdt), "shift": _randn((B, D), device, cdt),
                "scale": _randn((B, D), device, cdt, 0.5)}

    return make


def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _modulate_case(T: int, layout: str) -> KernelCase:
    xdt, cdt = LAYOUTS[layout]
    x, h, vec = _meta((B, T, D), xdt), _meta((B, T, D), cdt), _meta((B, D), cdt)
    return KernelCase(
        op="adaln_modulate", shape=f"B{B} T{T} D{D} {layout}",
        make_inputs=_modulate_inputs(T, xdt, cdt), triton=adaln_modulate,
        reference=adaln_modulate_ref,
        bytes_fwd=nbytes(x, vec, vec) + nbytes(h),  # x, shift, scale -> h
        # dh, x, scale -> dx, dshift, dscale
        bytes_bwd=nbytes(h, x, vec) + nbytes(x, vec, vec),
    )


def _residual_case(T: int, layout: str) -> KernelCase:
    xdt, cdt = LAYOUTS[layout]
    x, row, vec = _meta((B, T, D), xdt), _meta((B, T, D), cdt), _meta((B, D), cdt)
    return KernelCase(
        op="residual_gate_adaln", shape=f"B{B} T{T} D{D} {layout}",
        make_inputs=_residual_inputs(T, xdt, cdt), triton=residual_gate_adaln,
        reference=residual_gate_adaln_ref,
        # x, y, gate, shift, scale -> x_out, h
        bytes_fwd=nbytes(x, row, vec, vec, vec) + nbytes(x, row),
        # dx_out, dh, x_out, y, gate, scale -> dx, dy, dgate, dshift, dscale
        bytes_bwd=nbytes(x, row, x, row, vec, vec) + nbytes(x, row, vec, vec, vec),
    )


CASES: list[KernelCase] = [make(T, layout) for layout in LAYOUTS for T in TOKENS
                           for make in (_modulate_case, _residual_case)]
