"""Token gather/scatter at SD-DiT-XL/2 training shapes: B=32, L=256, D=1152, bf16, keeping
K=205 tokens (mask ratio 0.2, SD-DiT) or K=128 (0.5, MaskDiT). Ids are int64, as argsort
returns them, and the Triton side runs with check_ids=False (the hot-loop setting).

Minimal bytes: each input read once, each output written once, ids included.
- gather fwd: K rows of x (+ pos, [L, D], read once) -> K rows; bwd: dout -> dx [B, L, D]
  (the zero rows are writes too). The fixed sin-cos pos takes no grad.
- scatter fwd: K rows of x_keep + the L-K masked rows of a [B, L, D] fill (or the [D]
  token) -> [B, L, D]; bwd: dout -> dx_keep and d(fill) ([B, L, D], or [D]).
"""

from __future__ import annotations

import torch

from bench._harness import Inputs, KernelCase, nbytes
from sdkernels.tokens import gather_tokens, gather_tokens_ref, scatter_tokens, scatter_tokens_ref

B, L, D = 32, 256, 1152
KEPT = (205, 128)
DTYPE = torch.bfloat16


def _randn(shape: tuple[int, ...], device: torch.device, grad: bool = True) -> torch.Tensor:
    return torch.randn(shape, device=device, dtype=DTYPE).requires_grad_(grad)


def _ids(K: int, device: torch.device) -> torch.Tensor:
    return torch.rand(B, L, device=device).argsort(dim=1)[:, :K]  # [B, K] int64, MAE style


def _meta(*shape: int, dtype: torch.dtype = DTYPE) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _gather_case(K: int, with_pos: bool) -> KernelCase:
    def make(device: torch.device) -> Inputs:
        inputs = {"x": _randn((B, L, D), device), "ids_keep": _ids(K, device)}
        if with_pos:
            inputs["pos"] = _randn((L, D), device, grad=False)
        return inputs

    kept, full, ids = _meta(B, K, D), _meta(B, L, D), _meta(B, K, dtype=torch.int64)
    pos_bytes = nbytes(_meta(L, D)) if with_pos else 0
    return KernelCase(
        op="gather_tokens_pos" if with_pos else "gather_tokens", shape=f"B{B} L{L} K{K} D{D} bf16",
        make_inputs=make,
        triton=lambda **kw: gather_tokens(**kw, check_ids=False), reference=gather_tokens_ref,
        bytes_fwd=nbytes(kept, ids) + pos_bytes + nbytes(kept),
        bytes_bwd=nbytes(kept, ids) + nbytes(full),
    )


def _scatter_case(K: int, vector_fill: bool) -> KernelCase:
    def make(device: torch.device) -> Inputs:
        fill = _randn((D,) if vector_fill else (B, L, D), device)
        return {"x_keep": _randn((B, K, D), device), "ids_keep": _ids(K, device), "fill": fill,
                "length": L}

    kept, full, ids = _meta(B, K, D), _meta(B, L, D), _meta(B, K, dtype=torch.int64)
    fill_read = _meta(D) if vector_fill else _meta(B, L - K, D)  # masked rows only
    fill_grad = _meta(D) if vector_fill else full
    return KernelCase(
        op="scatter_tokens_vec" if vector_fill else "scatter_tokens_full",
        shape=f"B{B} L{L} K{K} D{D} bf16", make_inputs=make,
        triton=lambda **kw: scatter_tokens(**kw, check_ids=False), reference=scatter_tokens_ref,
        bytes_fwd=nbytes(kept, ids, fill_read) + nbytes(full),
        bytes_bwd=nbytes(full, ids) + nbytes(kept, fill_grad),
    )


CASES: list[KernelCase] = [
    case
    for K in KEPT
    for case in (_gather_case(K, False), _gather_case(K, True), _scatter_case(K, False),
                 _scatter_case(K, True))
]
