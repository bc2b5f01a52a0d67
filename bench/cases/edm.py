"""EDM preconditioning and loss at SD-DiT-XL/2 training shapes: latents [32, 4, 32, 32] in
bf16, patch 2 (L = 256 tokens).

Training runs the preconditioning forward only (x0, noise and sigma need no gradient); its
backward is timed for dx0 and dnoise. The loss backward is the training one: dF only.
The Triton path skips the value check (`check=False`), which costs a host sync.
"""

from __future__ import annotations

import torch

from bench._harness import Inputs, KernelCase, nbytes
from sdkernels.edm import edm_loss, edm_loss_ref, edm_precondition, edm_precondition_ref

SHAPE = (32, 4, 32, 32)
DTYPE = torch.bfloat16
PATCH = 2
TOKENS = (SHAPE[2] // PATCH) * (SHAPE[3] // PATCH)
SIGMA_MIN = 0.002


def _latent(device: torch.device, requires_grad: bool = False) -> torch.Tensor:
    return torch.randn(SHAPE, device=device, dtype=DTYPE).requires_grad_(requires_grad)


def _sigma(device: torch.device) -> torch.Tensor:
    return torch.exp(-1.2 + 1.2 * torch.randn(SHAPE[0], device=device))


def _keep_weights(device: torch.device, keep: int) -> torch.Tensor:
    """[B, L] 0/1 weights with exactly `keep` random patches kept per sample (MaskDiT)."""
    ids = torch.rand(SHAPE[0], TOKENS, device=device).argsort(dim=1)[:, :keep]
    return torch.zeros(SHAPE[0], TOKENS, device=device).scatter_(1, ids, 1.0)


def _fused_precondition(**kw) -> tuple[torch.Tensor, ...]:
    return edm_precondition(**kw, check=False)


def _fused_loss(**kw) -> torch.Tensor:
    return edm_loss(**kw, check=False)


def _precondition_case(sigma_min: float | None) -> KernelCase:
    def make_inputs(device: torch.device) -> Inputs:
        return {"x0": _latent(device, True), "noise": _latent(device, True),
                "sigma": _sigma(device), "sigma_min": sigma_min}

    latent = torch.empty(SHAPE, dtype=DTYPE, device="meta")
    sigma = torch.empty(SHAPE[0], device="meta")
    views = 2 if sigma_min is None else 3  # x_noisy, x_in[, x_in_teacher]
    return KernelCase(
        op="edm_precondition" if sigma_min is None else "edm_precondition+teacher",
        shape="x[32,4,32,32] bf16",
        make_inputs=make_inputs,
        triton=_fused_precondition,
        reference=edm_precondition_ref,
        bytes_fwd=nbytes(latent, latent, sigma) + views * nbytes(latent) + nbytes(sigma),
        bytes_bwd=views * nbytes(latent) + 2 * nbytes(latent) + nbytes(sigma),
    )


def _loss_case(keep: int | None) -> KernelCase:
    def make_inputs(device: torch.device) -> Inputs:
        inputs: Inputs = {"F": _latent(device, True), "x_noisy": _latent(device),
                          "x0": _latent(device), "sigma": _sigma(device)}
        if keep is not None:
            inputs |= {"patch_weight": _keep_weights(device, keep), "patch_size": PATCH}
        return inputs

    latent = torch.empty(SHAPE, dtype=DTYPE, device="meta")
    per_sample = torch.empty(SHAPE[0], device="meta")  # sigma, the loss and its grad
    weight = torch.empty(SHAPE[0], TOKENS, device="meta")
    extra = nbytes(weight) if keep is not None else 0
    return KernelCase(
        op="edm_loss" if keep is None else f"edm_loss_patch{PATCH}_keep{keep}",
        shape="x[32,4,32,32] bf16" + ("" if keep is None else f" L={TOKENS}"),
        make_inputs=make_inputs,
        triton=_fused_loss,
        reference=edm_loss_ref,
        bytes_fwd=3 * nbytes(latent) + 2 * nbytes(per_sample) + extra,  # read F, x_noisy, x0
        bytes_bwd=4 * nbytes(latent) + 2 * nbytes(per_sample) + extra,  # ... and write dF
    )


CASES: list[KernelCase] = [
    _precondition_case(None),
    _precondition_case(SIGMA_MIN),
    _loss_case(None),
    _loss_case(205),
    _loss_case(128),
]
