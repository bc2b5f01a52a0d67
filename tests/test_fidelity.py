"""Method fidelity (issue 10): every assumed choice is a validated config field that changes
the computation, and the MaskDiT baseline is built as its authors built it."""

from __future__ import annotations

import json
import math
import os

import numerics
import pytest
import torch
from numerics import losses_and_grads, model_batch

import model
import sdkernels

MICRO = dict(input_size=8, in_channels=2, num_classes=5, hidden_size=64, depth=3, num_heads=2,
             head_hidden_dim=32, head_bottleneck_dim=16, n_prototypes=24, decoder_depth=1,
             mask_ratio=0.25)


def sd_micro(**overrides) -> model.DiffusionTransformer:
    return model.build("SD-DiT-tiny", **{**MICRO, **overrides})


def perturb_(net: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    numerics.perturb_(net, scale, seed)


def batch(net: model.DiffusionTransformer, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return model_batch(net, n, seed=7)


def twin(net: model.DiffusionTransformer, **overrides) -> model.DiffusionTransformer:
    """The same weights under other config values."""
    other = sd_micro(**{k: getattr(net.config, k) for k in MICRO}, **overrides)
    other.load_state_dict(net.state_dict())
    return other


def losses_at_seed(net: model.DiffusionTransformer, seed: int = 3) -> dict[str, torch.Tensor]:
    x0, y = batch(net)
    torch.manual_seed(seed)
    return net.training_losses(x0, y)


# ----------------------------------------------------------------------------- momentum
# The momentum schedule itself is the training schedule's (tests/test_schedule.py).
@pytest.mark.parametrize("start, end", [(0.9, 0.8), (-0.1, 1.0), (0.9, 1.1), ("0.9", 1.0)])
def test_teacher_momentum_is_validated(start, end) -> None:
    with pytest.raises(ValueError, match="teacher_momentum"):
        sd_micro(teacher_momentum_start=start, teacher_momentum_end=end)


# ----------------------------------------------------------------------------- teacher sigma
def capture_c_noise(net: model.DiffusionTransformer) -> dict[str, list[torch.Tensor]]:
    seen: dict[str, list[torch.Tensor]] = {"student": [], "teacher": [], "teacher_x": []}
    net.backbone.t_embedder.register_forward_hook(
        lambda m, args, out: seen["student"].append(args[0].clone()))
    net.method.teacher.t_embedder.register_forward_hook(
        lambda m, args, out: seen["teacher"].append(args[0].clone()))
    net.method.teacher.x_embedder.register_forward_hook(
        lambda m, args, out: seen["teacher_x"].append(args[0].clone()))
    return seen


def test_teacher_sigma_modes_condition_and_feed_the_teacher() -> None:
    base = sd_micro()
    perturb_(base)
    results = {}
    for mode in ("min", "student", "logu:0.002:0.05"):
        net = twin(base, teacher_sigma=mode)
        seen = capture_c_noise(net)
        results[mode] = (losses_at_seed(net), seen)
    (_, s_min), (_, s_stu), (_, s_logu) = results.values()
    torch.testing.assert_close(s_min["teacher"][0],
                               torch.full((3,), math.log(0.002) / 4))  # today's default
    torch.testing.assert_close(s_stu["teacher"][0], s_stu["student"][0])  # student's sigma
    torch.testing.assert_close(s_stu["student"][0], s_min["student"][0])  # same draw
    torch.testing.assert_close(s_stu["teacher_x"][0], s_min["teacher_x"][0])  # sigma_min view
    c = s_logu["teacher"][0]
    assert ((c >= math.log(0.002) / 4 - 1e-6) & (c <= math.log(0.05) / 4 + 1e-6)).all()
    assert c.unique().numel() == 3  # one sigma per sample
    assert not torch.allclose(s_logu["teacher_x"][0], s_min["teacher_x"][0])  # its own view
    # The teacher's input at sigma_t is c_in(sigma_t)(x0 + sigma_t n) with the student's n.
    dis = [r[0]["dis"] for r in results.values()]
    assert not torch.isclose(dis[0], dis[1]) and not torch.isclose(dis[0], dis[2])
    for r in results.values():  # the generative loss does not depend on the teacher
        torch.testing.assert_close(r[0]["gen"], results["min"][0]["gen"])


def test_sampled_teacher_view_uses_the_students_noise() -> None:
    from model.precond import teacher_view

    x0, n = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    s = torch.tensor([0.01, 0.04])
    expected = (x0 + s[:, None, None, None] * n) / (s**2 + 0.25).sqrt()[:, None, None, None]
    torch.testing.assert_close(teacher_view(x0, n, s, 0.5), expected)


@pytest.mark.parametrize("value", ["max", "logu:0.05", "logu:0.05:0.002", "logu:0:0.1",
                                   "logu:a:b", "uniform:0.002:0.05"])
def test_teacher_sigma_is_validated(value: str) -> None:
    with pytest.raises(ValueError, match="teacher_sigma"):
        sd_micro(teacher_sigma=value)


# ----------------------------------------------------------------------------- centre
def test_center_tokens_all_averages_every_teacher_token() -> None:
    base = sd_micro(center_momentum=0.0)  # the centre becomes the batch mean
    perturb_(base)
    centers = {}
    for mode in ("all", "kept"):
        net = twin(base, center_tokens=mode, center_momentum=0.0)
        logits: list[torch.Tensor] = []
        net.method.teacher.head.register_forward_hook(
            lambda m, a, out, seen=logits: seen.append(out))
        losses_at_seed(net)
        tokens = logits[0].shape[1]
        assert tokens == (net.config.num_tokens if mode == "all" else net.config.num_kept)
        torch.testing.assert_close(net.method.center, logits[0].flatten(0, 1).mean(0))
        centers[mode] = net.method.center.clone()
    assert not torch.allclose(centers["all"], centers["kept"])
    # Same discriminative loss at step 0 (the centre only moves after the loss).
    a, k = (losses_at_seed(twin(base, center_tokens=m)) for m in ("all", "kept"))
    torch.testing.assert_close(a["dis"], k["dis"], rtol=1e-5, atol=1e-6)


def test_center_tokens_is_validated() -> None:
    with pytest.raises(ValueError, match="center_tokens"):
        sd_micro(center_tokens="masked")
    assert sd_micro().config.center_tokens == "all"  # iBOT's default


@pytest.mark.parametrize("overrides", [
    dict(teacher_sigma="logu:0.002:0.05", center_tokens="all"),
    dict(teacher_sigma="student", center_tokens="kept"),
])
def test_kernel_path_matches_reference_for_teacher_options(overrides: dict) -> None:
    ref = sd_micro(**overrides)
    perturb_(ref)
    fused = sd_micro(use_kernels=True, **overrides)
    fused.load_state_dict(ref.state_dict())
    x0, y = batch(ref)
    assert sdkernels.current_backend(x0) == "triton"
    out = []
    for net in (ref, fused):
        out.append((*losses_and_grads(net, x0, y), net.method.center.clone()))
    (rl, rg, rc), (kl, kg, kc) = out
    for name in rl:
        torch.testing.assert_close(kl[name], rl[name], rtol=1e-4, atol=1e-6)
    for name, g in rg.items():
        torch.testing.assert_close(kg[name], g, rtol=1e-4, atol=1e-4 * g.abs().max().item() + 1e-9)
    torch.testing.assert_close(kc, rc, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- saved with a run
def test_teacher_fields_are_saved_with_the_run(tmp_path) -> None:
    from tests.test_train import small_batches, tiny_config
    from train import checkpoint as ckpt
    from train.loop import train

    fields = dict(teacher_momentum_start=0.99, teacher_momentum_end=0.999,
                  teacher_sigma="logu:0.002:0.05", center_tokens="kept")
    sets = [f"model.overrides.{k}={json.dumps(v)}" for k, v in fields.items()]
    result = train(tiny_config(tmp_path / "run", *sets, "schedule.total_steps=2",
                               "schedule.ckpt_every=2"), batches=small_batches())
    state = ckpt.load_checkpoint(result.checkpoint)
    for key, value in fields.items():
        assert state["config"]["model"]["overrides"][key] == value
        assert state["model_build"]["overrides"][key] == value
    rebuilt = ckpt.build_net(state["model_build"], torch.device("cpu"))
    for key, value in fields.items():
        assert getattr(rebuilt.config, key) == value
    assert os.path.exists(result.checkpoint)


# ----------------------------------------------------------------------------- MaskDiT
# Trainable parameters of the public MaskDiT code (Anima-Lab/MaskDiT, models/maskdit.py:
# DiT_XL_2(input_size=32, in_channels=4, num_classes=1000, use_decoder=True,
# mae_loss_coef=0.1)), counted by instantiating that file: its 730.1M.
PUBLIC_MASKDIT_XL2 = 730_115_216


def trainable(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def test_maskdit_xl2_parameter_count_matches_public_code() -> None:
    with torch.device("meta"):
        net = model.build("MaskDiT-XL/2")
    count = trainable(net)
    # The one difference: our learned null-class row (1152) where MaskDiT feeds zeros.
    assert count - PUBLIC_MASKDIT_XL2 == 1152
    assert abs(count - PUBLIC_MASKDIT_XL2) / PUBLIC_MASKDIT_XL2 < 1e-3
    cfg = net.config
    assert (cfg.decoder_depth, cfg.dec_width, cfg.dec_heads) == (8, 512, 16)  # as published


def test_maskdit_decoder_scales_with_the_backbone() -> None:
    shapes = {s: model.make_config(f"MaskDiT-{s}/2") for s in ("S", "B", "L", "XL")}
    assert {s: (c.decoder_depth, c.dec_width, c.dec_heads) for s, c in shapes.items()} == {
        "S": (3, 160, 5), "B": (3, 352, 11), "L": (7, 448, 14), "XL": (8, 512, 16)}
    # The decoder's share of training compute stays near XL's.
    from model.flops import decoder_macs, training_macs

    shares = [decoder_macs(c, c.num_kept) / (training_macs(c) / 3) for c in shapes.values()]
    assert max(shares) - min(shares) < 0.03, shares
    # MaskDiT-S/2 now costs about what DiT-S/2 does, not 2x its parameters.
    with torch.device("meta"):
        small, dit = model.build("MaskDiT-S/2"), model.build("DiT-S/2")
    assert trainable(small) < 1.1 * trainable(dit)


def test_maskdit_decoder_starts_from_mask_token_plus_position() -> None:
    net = model.build("MaskDiT-tiny", input_size=8, hidden_size=64, depth=2, num_heads=2)
    bb, cfg = net.backbone, net.config
    assert bb.decoder_layer is not None and bb.mask_token.abs().sum() > 0
    x0, y = batch(net, 2)
    seen: list[torch.Tensor] = []
    # A block takes (pending branch, residual stream, c): the first has no branch pending.
    bb.decoder[0].register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    torch.manual_seed(0)
    ids_keep = torch.stack([torch.randperm(cfg.num_tokens)[:cfg.num_kept].sort().values
                            for _ in range(2)])
    tokens, c = bb.embed(x0, torch.zeros(2), y)
    z = bb.encode(torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, 64)), c)
    assert z.abs().sum() > 0  # the encoder output is not zero; the interface zeroes it
    bb.decode(z, c, ids_keep, tokens)
    first = seen[0]  # [B, L, Dd], the decoder's first input
    pos = bb.decoder_pos_embed[0]
    masked = torch.ones(2, cfg.num_tokens, dtype=torch.bool)
    masked.scatter_(1, ids_keep, False)
    for b in range(2):
        torch.testing.assert_close(first[b][masked[b]], (bb.mask_token + pos)[masked[b]])
        torch.testing.assert_close(first[b][~masked[b]], pos[~masked[b]])
    # The interface itself is MaskDiT's: no-affine LayerNorm, adaLN(c), Linear.
    layer = bb.decoder_layer
    assert [type(m) for m in layer.adaLN_modulation] == [torch.nn.SiLU, torch.nn.Linear]
    assert layer.adaLN_modulation[1].weight.shape == (2 * 64, 64)
    assert layer.linear.weight.shape == (cfg.dec_width, 64)
    with torch.no_grad():
        layer.adaLN_modulation[1].bias.normal_()
        layer.linear.weight.normal_()
    shift, scale = layer.adaLN_modulation(c).chunk(2, dim=-1)
    expected = layer.linear(torch.nn.functional.layer_norm(z, (64,), eps=1e-6)
                            * (1 + scale[:, None]) + shift[:, None])
    torch.testing.assert_close(layer(z, c, fused=False), expected)


def test_imagenet_configs_follow_the_public_recipes() -> None:
    import glob

    from train.config import load_config

    paths = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs",
                                          "imagenet256", "[!_]*.toml")))
    assert len(paths) >= 9
    for path in paths:
        cfg = load_config(path)
        assert cfg.optim.grad_clip == 0, path  # neither DiT nor MaskDiT clips
        assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps) == (1e-4, 0, 0)
        assert cfg.ema.decay == 0.9999, path
