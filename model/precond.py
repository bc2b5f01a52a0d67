"""EDM preconditioning and losses (Karras et al. 2022), kept apart from the backbone.

With sd = sigma_data:
    c_in = 1 / sqrt(sigma^2 + sd^2)        c_skip = sd^2 / (sigma^2 + sd^2)
    c_out = sigma sd / sqrt(sigma^2 + sd^2) c_noise = ln(sigma) / 4
    D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, y)
    lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2
Training draws ln(sigma) ~ N(P_mean, P_std^2). `fused` picks the sdkernels ops; the torch
code here is the reference path.
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


def sample_sigma(batch: int, P_mean: float, P_std: float, device: torch.device) -> torch.Tensor:
    return (torch.randn(batch, device=device) * P_std + P_mean).exp()  # [B]


def precondition(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                 sigma_min: float | None, sigma_data: float, fused: bool) -> NoisyViews:
    """Both views from one noise draw: the student's at sigma, the teacher's at sigma_min."""
    if fused:
        import sdkernels

        # check=False: sigma = exp(.) is positive by construction; skip the host sync.
        out = sdkernels.edm_precondition(x0, noise, sigma, sigma_min, sigma_data, check=False)
        return NoisyViews(*out) if sigma_min is not None else NoisyViews(*out, None)
    s = edm_scalings(sigma.float(), sigma_data)
    x_noisy = x0 + per_sample(sigma, x0) * noise
    x_in = per_sample(s.c_in, x0) * x_noisy
    x_in_teacher = None
    if sigma_min is not None:
        x_in_teacher = (x0 + sigma_min * noise) / math.sqrt(sigma_min**2 + sigma_data**2)
    return NoisyViews(x_noisy, x_in, s.c_noise, x_in_teacher)


def teacher_view(x0: torch.Tensor, noise: torch.Tensor, sigma_t: torch.Tensor,
                 sigma_data: float) -> torch.Tensor:
    """The teacher's network input at per-sample noise levels sigma_t [B], from the student's
    noise draw: c_in(sigma_t) (x0 + sigma_t n), [B, C, H, W]."""
    sigma_t = sigma_t.float()
    c_in = (sigma_t.square() + sigma_data**2).rsqrt()  # [B]
    return per_sample(c_in, x0) * (x0 + per_sample(sigma_t, x0) * noise)


def sample_log_uniform(batch: int, low: float, high: float, device: torch.device
                       ) -> torch.Tensor:
    """[B] sigmas with ln(sigma) ~ U(ln low, ln high)."""
    u = torch.rand(batch, device=device)
    return (math.log(low) + u * (math.log(high) - math.log(low))).exp()


def patch_means(err: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L]: the mean of each p x p patch (over channels too), raster order."""
    B, C, H, W = err.shape
    p = patch_size
    return err.reshape(B, C, H // p, p, W // p, p).mean(dim=(1, 3, 5)).flatten(1)


def weighted_patch_mean(err: torch.Tensor, patch_weight: torch.Tensor | None,
                        patch_size: int) -> torch.Tensor:
    """Per-sample mean of err [B, C, H, W], weighted over patches when patch_weight [B, L]."""
    if patch_weight is None:
        return err.flatten(1).mean(1)  # [B]
    w = patch_weight.float()
    total = w.sum(1)  # [B]
    return (w * patch_means(err, patch_size)).sum(1) / torch.where(total > 0, total, 1.0)


def edm_loss(F: torch.Tensor, x_noisy: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
             sigma_data: float, patch_weight: torch.Tensor | None, patch_size: int,
             fused: bool) -> torch.Tensor:
    """Per-sample lambda(sigma) * mean (D - x0)^2, fp32 [B]."""
    if fused:
        import sdkernels

        # The op wants one dtype; under autocast F comes out in fp16/bf16.
        return sdkernels.edm_loss(F.to(x0.dtype), x_noisy, x0, sigma, sigma_data, patch_weight,
                                  patch_size if patch_weight is not None else None, check=False)
    sigma = sigma.float()
    s = edm_scalings(sigma, sigma_data)
    denom = sigma.square() + sigma_data**2
    # D - x0 = c_skip (x_noisy - x0) - (1 - c_skip) x0 + c_out F: no cancellation of
    # c_skip x_noisy against x0 when sigma is small and c_skip -> 1.
    err = (per_sample(s.c_skip, x0) * (x_noisy - x0).float()
           - per_sample(sigma.square() / denom, x0) * x0.float()
           + per_sample(s.c_out, x0) * F.float())  # [B, C, H, W]
    lam = denom / (sigma * sigma_data) ** 2  # [B]
    return lam * weighted_patch_mean(err.square(), patch_weight, patch_size)


def mae_loss(F: torch.Tensor, x_noisy: torch.Tensor, sigma: torch.Tensor, sigma_data: float,
             patch_weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """MaskDiT's auxiliary loss, per sample [B]: the denoised output D against the noisy
    input, normalised per patch, averaged over the weighted (masked) patches; no lambda."""
    s = edm_scalings(sigma.float(), sigma_data)
    D = per_sample(s.c_skip, x_noisy) * x_noisy + per_sample(s.c_out, x_noisy) * F.float()
    B, C, H, W = x_noisy.shape
    p, g = patch_size, H // patch_size

    def to_patches(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, -1)

    target = to_patches(x_noisy.float())  # [B, L, C*p*p]
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (to_patches(D) - target).square().mean(-1)  # [B, L]
    w = patch_weight.float()
    return (w * per_patch).sum(1) / w.sum(1).clamp_min(1.0)
