"""Tolerances by dtype, shared by the kernel tests.

fp32: elementwise, rtol 1e-5 with an absolute floor of 1e-5 x the largest |reference|
(sums over tokens reorder additions).
fp16/bf16: the kernel's worst error against an fp32 reference may be at most twice the
worst error of torch's own computation in that dtype against the same reference.
"""

from __future__ import annotations

import torch

FP32_RTOL = 1e-5


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, name: str,
                      rtol: float = FP32_RTOL) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten output?)"
    floor = rtol * float(expected.abs().max().clamp_min(1e-30))
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rtol, atol=floor,
                               msg=lambda m: f"{name}: {m}")


def assert_within_torch_error(actual: torch.Tensor, torch_lowp: torch.Tensor,
                              truth: torch.Tensor, name: str, factor: float = 2.0) -> None:
    """actual, torch_lowp: results in fp16/bf16; truth: the fp32 computation."""
    assert actual.shape == truth.shape, f"{name}: shape {actual.shape} != {truth.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (unwritten output?)"
    truth = truth.float()
    err = (actual.float() - truth).abs().max().item()
    ref_err = (torch_lowp.float() - truth).abs().max().item()
    # When torch is exact in low precision, allow one ulp of the dtype at the output scale.
    ulp = torch.finfo(actual.dtype).eps * float(truth.abs().max().clamp_min(1e-30))
    bound = factor * max(ref_err, ulp)
    assert err <= bound, f"{name}: max error {err:.3e} > {factor} x torch's {ref_err:.3e}"


def assert_matches(actual: torch.Tensor, torch_same_dtype: torch.Tensor, truth: torch.Tensor,
                   name: str) -> None:
    """Dispatch on dtype: fp32 elementwise, fp16/bf16 against torch's own error."""
    if actual.dtype == torch.float32:
        assert_close_fp32(actual, truth, name)
    else:
        assert_within_torch_error(actual, torch_same_dtype, truth, name)


def perturb_(net: torch.nn.Module, scale: float = 0.05, seed: int | None = None) -> None:
    """Move every parameter off its (partly zero) init so all paths carry signal; from the
    global RNG, or from `seed` when given."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def model_batch(net: torch.nn.Module, n: int, seed: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random inputs of a net's shape: x [n, C, H, W] and labels [n]."""
    c = net.config
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return (torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=gen),
            torch.randint(0, c.num_classes, (n,), generator=gen))


def losses_and_grads(net: torch.nn.Module, x0: torch.Tensor, y: torch.Tensor,
                     seed: int = 1234) -> tuple[dict, dict]:
    """One training-loss forward and backward under a fixed seed (the same noise, sigma,
    label dropout and masks for every net it is called on): (losses, trainable grads)."""
    torch.manual_seed(seed)
    losses = net.training_losses(x0, y)
    losses["loss"].backward()
    return losses, {n: p.grad for n, p in net.named_parameters() if p.requires_grad}


def assert_kernel_path_matches(ref: torch.nn.Module, fused: torch.nn.Module,
                               x0: torch.Tensor, y: torch.Tensor) -> None:
    """The fused net (same weights) against the reference: every loss, every trainable
    gradient (relative to its largest entry) and the inference denoiser, fp32 tolerances."""
    (ref_losses, ref_grads), (k_losses, k_grads) = (losses_and_grads(net, x0, y)
                                                    for net in (ref, fused))
    assert ref_losses.keys() == k_losses.keys()
    for name in ref_losses:
        torch.testing.assert_close(k_losses[name], ref_losses[name], rtol=1e-4, atol=1e-6)
    assert ref_grads.keys() == k_grads.keys()
    for name, g in ref_grads.items():
        assert g is not None and k_grads[name] is not None, name
        scale = g.abs().max().item()
        torch.testing.assert_close(k_grads[name], g, rtol=1e-4, atol=1e-4 * scale + 1e-9,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")
    torch.testing.assert_close(fused.denoise(x0, 0.5, y), ref.denoise(x0, 0.5, y),
                               rtol=1e-4, atol=1e-5)


def measured_macs(net: torch.nn.Module, train: bool) -> float:
    """Multiply-accumulates per image that torch's FLOP counter sees: a training step
    (forward and backward) or one denoiser evaluation, at batch 2."""
    from torch.utils.flop_counter import FlopCounterMode

    c = net.config
    x = torch.randn(2, c.in_channels, c.input_size, c.input_size)
    y = torch.tensor([0, 1])
    with FlopCounterMode(display=False) as counter:
        if train:
            net.training_losses(x, y)["loss"].backward()
        else:
            net.denoise(x, 1.0, y)
    return counter.get_total_flops() / 2 / 2
