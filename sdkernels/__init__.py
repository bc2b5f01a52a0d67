"""Fused Triton kernels for SD-DiT training, each with a pure-torch reference.

The bottom layer: it imports only torch and triton, never model/, train/, metrics/ or
bench/. Every op runs Triton on CUDA tensors (or under TRITON_INTERPRET=1 on CPU) and its
reference otherwise; see `_runtime.py`.

Layout: one file per op family (`adaln`, `tokens`, `edm`, `optim`) holding its math, its
reference, its kernels and their launchers; shared machinery apart: `_ops` (torch.library
registration and the one eager call path), `_checks` (input validation), `_runtime`
(where an op runs), `_lowering` and `_lowering_cases` (GPU lowering in CI).
"""

from sdkernels._runtime import current_backend, force_backend, poison_outputs
from sdkernels.adaln import (
    adaln_modulate,
    adaln_modulate_ref,
    residual_gate_adaln,
    residual_gate_adaln_ref,
)
from sdkernels.edm import edm_loss, edm_loss_ref, edm_precondition, edm_precondition_ref
from sdkernels.tokens import gather_tokens, gather_tokens_ref, scatter_tokens, scatter_tokens_ref

__all__ = [
    "adaln_modulate",
    "adaln_modulate_ref",
    "current_backend",
    "edm_loss",
    "edm_loss_ref",
    "edm_precondition",
    "edm_precondition_ref",
    "force_backend",
    "gather_tokens",
    "gather_tokens_ref",
    "poison_outputs",
    "residual_gate_adaln",
    "residual_gate_adaln_ref",
    "scatter_tokens",
    "scatter_tokens_ref",
]
