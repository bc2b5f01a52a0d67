"""EDM's deterministic 2nd-order Heun sampler (Karras et al. 2022, Algorithm 1).

    sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho,  sigma_N = 0
    x_0 = sigma_0 * eps,  eps ~ N(0, I) from a generator seeded per sample
    for i in 0..N-1:
        d   = (x_i - D(x_i; sigma_i)) / sigma_i                   Euler step
        x_{i+1} = x_i + (sigma_{i+1} - sigma_i) d
        if i < N-1:                                               Heun correction
            d'  = (x_{i+1} - D(x_{i+1}; sigma_{i+1})) / sigma_{i+1}
            x_{i+1} = x_i + (sigma_{i+1} - sigma_i) (d + d') / 2
That is 2N - 1 network evaluations. The state is float64; D runs in the network's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def edm_sigma_steps(num_steps: int, sigma_min: float, sigma_max: float, rho: float,
                    device: torch.device) -> torch.Tensor:
    """The N noise levels of the schedule and a final 0: [N + 1] float64."""
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    ramp = i / max(num_steps - 1, 1)
    start, end = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (start + ramp * (end - start)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], device: torch.device
                  ) -> torch.Tensor:
    """One generator per seed, so a sample never depends on the rest of its batch."""
    return torch.stack([
        torch.randn(shape, generator=torch.Generator(device).manual_seed(int(seed)),
                    device=device)
        for seed in seeds
    ])  # [N, C, H, W]


@torch.no_grad()
def edm_sample(net: nn.Module, labels: torch.Tensor, seeds: Sequence[int], num_steps: int = 18,
               sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               cfg_scale: float = 1.0, progress: bool = False) -> torch.Tensor:
    """Samples [N, C, H, W] float32 (data range ~[-1, 1]) on the net's device."""
    if len(seeds) != len(labels):
        raise ValueError(f"seeds ({len(seeds)}) and labels ({len(labels)}) must match in length")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    cfg = net.config
    device = next(net.parameters()).device
    labels = labels.to(device)
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, device)  # [N + 1]

    x_next = initial_noise(seeds, shape, device).double() * t_steps[0]  # [N, C, H, W] fp64
    steps = list(enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="EDM sampling", unit="step")
    for i, (t_cur, t_next) in steps:
        x_cur = x_next
        d_cur = (x_cur - net.denoise(x_cur, t_cur, labels, cfg_scale)) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - net.denoise(x_next, t_next, labels, cfg_scale)) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.float()
