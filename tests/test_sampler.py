"""EDM Heun sampler: schedule, evaluation count, per-seed determinism, ODE accuracy."""

from __future__ import annotations

import torch
from torch import nn

import model
from model.config import ModelConfig
from model.sampler import edm_sigma_steps, initial_noise


class GaussianDenoiser(nn.Module):
    """The exact denoiser for data ~ N(0, s^2 I): D(x; sigma) = x s^2 / (sigma^2 + s^2).
    The probability-flow ODE then maps sigma_max * eps to s * eps / sqrt(1 + s^2/smax^2)."""

    def __init__(self, std: float) -> None:
        super().__init__()
        self.config = ModelConfig(method="DiT", input_size=4, in_channels=2, num_classes=3,
                                  hidden_size=8, depth=1, num_heads=1, decoder_depth=0,
                                  mask_ratio=0.0, lambda_dis=0.0)
        self.std = std
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the sampler a device
        self.calls = 0

    def denoise(self, x, sigma, y, cfg_scale=1.0):
        self.calls += 1
        return x * self.std**2 / (sigma**2 + self.std**2)


def test_sigma_schedule() -> None:
    steps = edm_sigma_steps(18, 0.002, 80.0, 7.0, torch.device("cpu"))
    assert steps.dtype == torch.float64 and steps.shape == (19,)
    torch.testing.assert_close(steps[[0, 17, 18]], torch.tensor([80.0, 0.002, 0.0],
                                                                dtype=torch.float64))
    assert (steps[1:] < steps[:-1]).all()


def test_heun_solves_the_gaussian_probability_flow_ode() -> None:
    seeds = [0, 1, 2, 3]
    eps = torch.stack([torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(s))
                       for s in seeds])
    exact = eps * 0.5 / (1 + 0.5**2 / 80.0**2) ** 0.5
    errors = {}
    for steps in (16, 32, 64):
        net = GaussianDenoiser(std=0.5)
        out = model.edm_sample(net, torch.zeros(4, dtype=torch.long), seeds, num_steps=steps)
        assert net.calls == 2 * steps - 1  # a correction on every step but the last
        assert out.dtype == torch.float32 and out.shape == (4, 2, 4, 4)
        errors[steps] = ((out - exact).abs().max() / exact.abs().max()).item()
    assert errors[64] < 0.01
    for coarse, fine in ((16, 32), (32, 64)):  # Heun is 2nd order: halving h quarters the error
        assert 3.0 < errors[coarse] / errors[fine] < 5.5, errors


def test_a_sample_does_not_depend_on_its_batch() -> None:
    net = model.build("DiT-tiny", input_size=8, in_channels=2, num_classes=5, hidden_size=64,
                      depth=2, num_heads=2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    pair = model.edm_sample(net, torch.tensor([1, 4]), [3, 5], num_steps=4, cfg_scale=1.5)
    alone = model.edm_sample(net, torch.tensor([4]), [5], num_steps=4, cfg_scale=1.5)
    again = model.edm_sample(net, torch.tensor([4]), [5], num_steps=4, cfg_scale=1.5)
    # The noise is bit-identical; the network's fp32 matmuls may sum in a batch-dependent order.
    assert torch.equal(initial_noise([3, 5], (2, 8, 8), torch.device("cpu"))[1:],
                       initial_noise([5], (2, 8, 8), torch.device("cpu")))
    torch.testing.assert_close(pair[1:], alone, rtol=1e-4, atol=1e-4)
    assert torch.equal(alone, again)
    assert not torch.allclose(pair[0], pair[1])
    assert pair.dtype == torch.float32 and torch.isfinite(pair).all()
