"""adaLN kernels at SD-DiT-XL/2 training shapes: B=32, D=1152, bf16, T=256 tokens (all
patches) and T=205 (the kept 80% at mask ratio 0.2).

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
DTYPE = torch.bfloat16


def _randn(shape: tuple[int, ...], device: torch.device, scale: float = 1.0) -> torch.Tensor:
    t = torch.randn(shape, device=device, dtype=torch.float32) * scale
    return t.to(DTYPE).requires_grad_(True)


def _modulate_inputs(T: int):
    def make(device: torch.device) -> Inputs:
        return {"x": _randn((B, T, D), device), "shift": _randn((B, D), device),
                "scale": _randn((B, D), device, 0.5)}

    return make


def _residual_inputs(T: int):
    def make(device: torch.device) -> Inputs:
        return {"x": _randn((B, T, D), device), "y": _randn((B, T, D), device),
                "gate": _randn((B, D), device), "shift": _randn((B, D), device),
                "scale": _randn((B, D), device, 0.5)}

    return make


def _meta(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.empty(shape, dtype=DTYPE, device="meta")


def _modulate_case(T: int) -> KernelCase:
    row, vec = _meta((B, T, D)), _meta((B, D))
    return KernelCase(
        op="adaln_modulate", shape=f"B{B} T{T} D{D} bf16",
        make_inputs=_modulate_inputs(T), triton=adaln_modulate, reference=adaln_modulate_ref,
        bytes_fwd=nbytes(row, vec, vec) + nbytes(row),  # x, shift, scale -> y
        # dy, x, scale -> dx, dshift, dscale
        bytes_bwd=nbytes(row, row, vec) + nbytes(row, vec, vec),
    )


def _residual_case(T: int) -> KernelCase:
    row, vec = _meta((B, T, D)), _meta((B, D))
    return KernelCase(
        op="residual_gate_adaln", shape=f"B{B} T{T} D{D} bf16",
        make_inputs=_residual_inputs(T), triton=residual_gate_adaln,
        reference=residual_gate_adaln_ref,
        # x, y, gate, shift, scale -> x_out, h
        bytes_fwd=nbytes(row, row, vec, vec, vec) + nbytes(row, row),
        # dx_out, dh, x_out, y, gate, scale -> dx, dy, dgate, dshift, dscale
        bytes_bwd=nbytes(row, row, row, row, vec, vec) + nbytes(row, row, vec, vec, vec),
    )


CASES: list[KernelCase] = [make(T) for T in TOKENS for make in (_modulate_case, _residual_case)]
