"""EDM preconditioning and losses (Karras et al. 2022), kept apart from the backbone.

With sd = sigma_data:
    c_in = 1 / sqrt(sigma^2 + sd^2)        c_skip = sd^2 / (sigma^2 + sd^2)
    c_out = sigma sd / sqrt(sigma^2 + sd^2) c_noise = ln(sigma) / 4
    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, y)
    lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2
Training draws ln(sigma) ~ N(P_mean, P_std^2). `fused` picks the sdkernels ops, else
their references (`sdkernels.edm_precondition_ref`, `edm_loss_ref`): one reference each.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class EDMScalings(NamedTuple):
    c_skip: torch.Tensor  # each [B]
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


class NoisyViews(NamedTuple):
    x_noisy: torch.Tensor  # [B, C, H, W] student view x0 + sigma n
    x_in: torch.Tensor  # [B, C, H, W] c_in(sigma) x_noisy, the network input
    c_noise: torch.Tensor  # [B] fp32
    x_in_teacher: torch.Tensor | None  # [B, C, H, W] c_in(sigma_min) (x0 + sigma_min n)


def edm_scalings(sigma: torch.Tensor, sigma_data: float) -> EDMScalings:
    denom = sigma.square() + sigma_data**2  # [B]
    return EDMScalings(c_skip=sigma_data**2 / denom, c_out=sigma * sigma_data / denom.sqrt(),
                       c_in=denom.rsqrt(), c_noise=sigma.log() / 4)


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] to broadcast against `like`."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def denoised(x: torch.Tensor, F: torch.Tensor, sigma: torch.Tensor, sigma_data: float
             ) -> torch.Tensor:
    """D(x; sigma) = c_skip x + c_out F from the network output F, fp32 [B, C, H, W]."""
    s = edm_scalings(sigma.float(), sigma_data)
    return per_sample(s.c_skip, x) * x + per_sample(s.c_out, x) * F.float()


def sample_sigma(batch: int, P_mean: float, P_std: float, device: torch.device) -> torch.Tensor:
    return (torch.randn(batch, device=device) * P_std + P_mean).exp()  # [B]


def precondition(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                 sigma_min: float | None, sigma_data: float, fused: bool) -> NoisyViews:
    """Both views from one noise draw: the student's at sigma, the teacher's at sigma_min."""
    import sdkernels

    if fused:
        # check=False: sigma = exp(.) is positive by construction; skip the host sync.
        out = sdkernels.edm_precondition(x0, noise, sigma, sigma_min, sigma_data, check=False)
    else:
        out = sdkernels.edm_precondition_ref(x0, noise, sigma, sigma_min, sigma_data)
    return NoisyViews(*out) if sigma_min is not None else NoisyViews(*out, None)


def teacher_view(x0: torch.Tensor, noise: torch.Tensor, sigma_t: torch.Tensor,
                 sigma_data: float) -> torch.Tensor:
    """The teacher's network input at per-sample noise levels sigma_t [B], from the student's
    noise draw: c_in(sigma_t) (x0 + sigma_t n), [B, C, H, W]: the preconditioning
    reference's x_in at sigma_t."""
    import sdkernels

    return sdkernels.edm_precondition_ref(x0, noise, sigma_t, None, sigma_data)[1]


def sample_log_uniform(batch: int, low: float, high: float, device: torch.device
                       ) -> torch.Tensor:
    """[B] sigmas with ln(sigma) ~ U(ln low, ln high)."""
    u = torch.rand(batch, device=device)
    return (math.log(low) + u * (math.log(high) - math.log(low))).exp()


def edm_loss(F: torch.Tensor, x_noisy: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
             sigma_data: float, patch_weight: torch.Tensor | None, patch_size: int,
             fused: bool) -> torch.Tensor:
    """Per-sample lambda(sigma) * mean (D - x0)^2, fp32 [B] (patch-weighted with
    patch_weight [B, L])."""
    import sdkernels

    # One dtype for the op; under autocast F comes out in fp16/bf16.
    args = (F.to(x0.dtype), x_noisy, x0, sigma, sigma_data, patch_weight,
            patch_size if patch_weight is not None else None)
    if fused:
        return sdkernels.edm_loss(*args, check=False)
    return sdkernels.edm_loss_ref(*args)


def mae_loss(F: torch.Tensor, x_noisy: torch.Tensor, sigma: torch.Tensor, sigma_data: float,
             patch_weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """MaskDiT's auxiliary loss, per sample [B]: the denoised output D against the noisy
    input, normalised per patch, averaged over the weighted (masked) patches; no lambda."""
    from sdkernels.edm import weighted_mean

    D = denoised(x_noisy, F, sigma, sigma_data)  # [B, C, H, W]
    B, C, H, W = x_noisy.shape
    p, g = patch_size, H // patch_size

    def to_patches(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, -1)

    target = to_patches(x_noisy.float())  # [B, L, C*p*p]
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (to_patches(D) - target).square().mean(-1)  # [B, L]
    return weighted_mean(per_patch, patch_weight)
