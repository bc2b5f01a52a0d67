"""Model tests on CPU: shapes, masks, teacher, inference path, kernel path == reference."""

from __future__ import annotations

import pytest
import torch
from numerics import assert_kernel_path_matches, model_batch, perturb_

import model
import sdkernels
from model.attention import Attention
from model.layers import random_keep_ids
from train.schedule import cosine

METHODS = ("SD-DiT", "DiT", "MaskDiT")
# The smallest configs that still exercise every part: 16 tokens of width 64.
MICRO = dict(input_size=8, in_channels=2, num_classes=5, hidden_size=64, depth=3, num_heads=2,
             head_hidden_dim=32, head_bottleneck_dim=16, n_prototypes=24)
MICRO_METHOD = {
    "SD-DiT": dict(decoder_depth=1, mask_ratio=0.25),
    "DiT": {},
    "MaskDiT": dict(decoder_depth=1, decoder_width=32, decoder_num_heads=2),
}


def micro(method: str, **overrides) -> model.DiffusionTransformer:
    return model.build(f"{method}-tiny", **{**MICRO, **MICRO_METHOD[method], **overrides})


def batch(net: model.DiffusionTransformer, n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    return model_batch(net, n)


def encoder_token_counts(net: model.DiffusionTransformer) -> tuple[list[int], list]:
    """Record the token count every student encoder block's attention sees."""
    seen: list[int] = []
    hooks = [blk.attn.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
             for blk in net.backbone.encoder]
    return seen, hooks


@pytest.mark.parametrize("method", METHODS)
def test_training_losses_and_denoise_shapes(method: str) -> None:
    net = micro(method)
    x0, y = batch(net, 3)
    seen, hooks = encoder_token_counts(net)
    losses = net.training_losses(x0, y)
    expected = {"SD-DiT": {"loss", "gen", "dis"}, "DiT": {"loss", "gen"},
                "MaskDiT": {"loss", "gen", "mae"}}[method]
    assert set(losses) == expected
    for name, value in losses.items():
        assert value.shape == () and torch.isfinite(value), name
    cfg = net.config
    total = losses["gen"] + cfg.lambda_dis * losses.get("dis", 0) + cfg.mae_weight * losses.get(
        "mae", 0)
    torch.testing.assert_close(losses["loss"], total)
    assert seen == [cfg.num_kept] * len(net.backbone.encoder)  # the encoder saw kept tokens only
    seen.clear()
    out = net.denoise(x0.double(), torch.tensor(0.7), y, cfg_scale=1.5)
    assert out.shape == x0.shape and out.dtype == torch.float64
    assert seen == [cfg.num_tokens] * len(net.backbone.encoder)  # inference: every token
    for h in hooks:
        h.remove()


def test_presets_follow_method() -> None:
    sd, dit, mask = (model.make_config(f"{m}-XL/2") for m in METHODS)
    assert (sd.mask_ratio, sd.decoder_depth, sd.encoder_depth, sd.n_prototypes) == (
        0.2, 4, 24, 8192)
    assert model.make_config("SD-DiT-B/4").decoder_depth == 2
    assert (dit.mask_ratio, dit.decoder_depth, dit.has_teacher) == (0.0, 0, False)
    assert (mask.mask_ratio, mask.encoder_depth, mask.dec_width, mask.decoder_fill) == (
        0.5, 28, 512, "mask_token")
    tiny = model.make_config("SD-DiT-tiny")
    assert (tiny.input_size, tiny.in_channels, tiny.num_classes, tiny.num_tokens) == (
        32, 1, 10, 256)


def test_masks_keep_exactly_l_keep_unique_tokens() -> None:
    ids = random_keep_ids(64, 256, 205, torch.device("cpu"))
    assert ids.shape == (64, 205)
    assert ((ids >= 0) & (ids < 256)).all()
    for row in ids:
        assert row.unique().numel() == 205
    assert not (ids == ids[0]).all(), "masks must differ between samples"
    cfg = model.make_config("SD-DiT-tiny", mask_ratio=0.2)
    assert cfg.num_kept == 256 - round(0.2 * 256)


def test_teacher_gets_no_gradients_and_is_no_trainable_parameter() -> None:
    net = micro("SD-DiT")
    perturb_(net)
    x0, y = batch(net)
    net.training_losses(x0, y)["loss"].backward()
    teacher = list(net.method.teacher.parameters())
    assert teacher and all(not p.requires_grad and p.grad is None for p in teacher)
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert not trainable & {id(p) for p in teacher}
    student = [p for n, p in net.named_parameters() if not n.startswith("method.teacher.")]
    assert all(p.grad is not None for p in student)
    assert net.method.head.prototypes.grad.abs().sum() > 0  # the discriminative loss trains it


def test_update_teacher_is_exact_ema() -> None:
    net = micro("SD-DiT")
    perturb_(net)  # student and teacher now differ
    teacher, student = net.method.teacher.pairs(net.backbone, net.method.head)
    before = [t.clone() for t in teacher]
    m = 0.9
    net.update_teacher(m)
    for t, t0, s in zip(teacher, before, student, strict=True):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s, rtol=1e-6, atol=1e-7)
    assert len(teacher) == len(list(net.method.teacher.parameters()))
    model.build("DiT-tiny").update_teacher(0.5)  # a no-op without a teacher


def test_center_moves_only_in_training_mode() -> None:
    net = micro("SD-DiT")
    perturb_(net)
    x0, y = batch(net)
    net.eval()
    net.training_losses(x0, y)
    assert (net.method.center == 0).all()
    net.train()
    net.training_losses(x0, y)
    assert net.method.center.abs().sum() > 0


@pytest.mark.parametrize("method", ["SD-DiT", "MaskDiT"])
def test_inference_ignores_teacher_and_draws_no_random_numbers(method: str) -> None:
    net = micro(method)
    perturb_(net)
    x, y = batch(net)
    state = torch.get_rng_state()
    out = net.denoise(x, 1.3, y)
    assert torch.equal(torch.get_rng_state(), state), "inference must not draw masks or noise"
    if getattr(net.method, "teacher", None) is not None:  # SD-DiT's
        perturb_(net.method.teacher, scale=1.0)
        net.method.teacher.register_forward_pre_hook(lambda *a: pytest.fail("teacher used"))
        net.method.head.register_forward_pre_hook(lambda *a: pytest.fail("head used"))
    torch.testing.assert_close(net.denoise(x, 1.3, y), out, rtol=0, atol=0)


def test_denoise_applies_cfg_on_every_channel() -> None:
    net = micro("DiT")
    perturb_(net, 0.2)
    x, y = batch(net)
    null = torch.full_like(y, net.config.num_classes)
    cond, uncond = net.denoise(x, 2.0, y), net.denoise(x, 2.0, null)
    assert (cond - uncond).abs().max() > 1e-3  # the label matters, so the test can fail
    guided = net.denoise(x, 2.0, y, cfg_scale=3.0)  # one batch of 2B: summation order differs
    torch.testing.assert_close(guided, uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_kernel_path_matches_reference(method: str) -> None:
    ref = micro(method)
    perturb_(ref)
    fused = micro(method, use_kernels=True)
    fused.load_state_dict(ref.state_dict())
    x0, y = batch(ref)
    assert sdkernels.current_backend(x0) == "triton"  # Triton (the interpreter on CPU) runs
    assert_kernel_path_matches(ref, fused, x0, y)  # identical noise, sigma, dropout, masks


def test_tiny_sd_dit_overfits_a_fixed_batch() -> None:
    net = model.build("SD-DiT-tiny", input_size=8, hidden_size=64, depth=4, num_heads=2,
                      n_prototypes=64, head_hidden_dim=64, head_bottleneck_dim=32)
    x0 = torch.rand(4, 1, 8, 8).round() * 2 - 1  # fixed binary images in [-1, 1]
    y = torch.arange(4)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    steps, history = 60, []
    for step in range(steps):
        torch.manual_seed(0)  # the same noise, sigma and masks each step: a fixed batch
        losses = net.training_losses(x0, y)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        opt.step()
        net.update_teacher(cosine(step, steps, 0.996, 1.0))  # the schedule's momentum
        history.append(losses["gen"].item())
    assert history[-1] < 0.3 * history[0], f"gen loss {history[0]:.3f} -> {history[-1]:.3f}"


def test_backbone_parameter_counts_match_dit_paper() -> None:
    published = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}
    for size, expected in published.items():
        with torch.device("meta"):
            net = model.build(f"DiT-{size}/2")
        count = sum(p.numel() for p in net.parameters())
        assert abs(count - expected) / expected < 0.01, f"DiT-{size}/2: {count / 1e6:.1f}M"
    with torch.device("meta"):
        sd = model.build("SD-DiT-XL/2")
    student = sum(p.numel() for n, p in sd.named_parameters()
                  if not n.startswith("method.teacher."))
    assert student > 675e6 and not any(p.requires_grad for p in sd.method.teacher.parameters())


@pytest.mark.parametrize("overrides, field", [
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(mask_ratio=-0.1), "mask_ratio"),
    (dict(decoder_depth=6), "decoder_depth"),
    (dict(patch_size=3), "patch_size"),
    (dict(input_size=30, patch_size=4), "patch_size"),
    (dict(num_heads=5), "num_heads"),
    (dict(attention="cuda-magic"), "attention"),
    (dict(gen_loss_tokens="some"), "gen_loss_tokens"),
    (dict(decoder_width=64), "decoder_width"),
    (dict(hidden_sise=64), "hidden_sise"),
])
def test_bad_configs_raise_clear_errors(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        model.build("SD-DiT-tiny", **overrides)


@pytest.mark.parametrize("name", ["SD-DiT-XXL/2", "Foo-S/2", "DiT-S/3", "DiT-S", "MaskDiT-small"])
def test_bad_names_raise_clear_errors(name: str) -> None:
    with pytest.raises(ValueError, match="model name|patch size"):
        model.build(name)


def test_attention_backends_are_queryable_and_agree() -> None:
    available = model.available_attention_backends()
    assert available[-2:] == ["sdpa", "math"]
    outputs = {}
    for backend in ("sdpa", "math"):
        torch.manual_seed(0)
        net = micro("DiT", attention=backend)
        perturb_(net, 0.2)
        x, y = batch(net)
        outputs[backend] = net.denoise(x, 1.0, y)
        assert model.attention_backend(net) == backend
        assert {m.last_backend for m in net.modules() if isinstance(m, Attention)} == {backend}
    torch.testing.assert_close(outputs["sdpa"], outputs["math"], rtol=1e-5, atol=1e-5)
    auto = micro("DiT")
    assert model.attention_backend(auto) == "sdpa"  # CPU fp32: flash-attn/xformers do not apply
    for missing in {"flash_attn", "xformers"} - set(available):
        with pytest.raises(ValueError, match="not importable"):
            micro("DiT", attention=missing)


def test_method_registry_and_encoder_patches() -> None:
    assert model.METHODS[:3] == ("SD-DiT", "DiT", "MaskDiT")
    expected = {"SD-DiT": 205, "DiT": 256, "MaskDiT": 128}
    for method in model.METHODS[:3]:
        cfg = model.make_config(f"{method}-XL/2")
        assert model.encoder_patches(cfg) == expected[method]
    with torch.device("meta"):
        net = model.build("SD-DiT-XL/2")
    assert model.encoder_patches(net) == 205
    assert model.encoder_patches(model.make_config("SD-DiT-tiny", mask_ratio=0.0)) == 256


def test_prenorm_blocks_compute_dits_block() -> None:
    """Each block adds the previous block's pending MLP branch fused with its own first
    adaLN and uses only its own modulation; settled, the stack is DiT's block (models.py:
    x += gate * branch(modulate(norm(x)))) applied block after block."""
    from torch.nn.functional import layer_norm

    from model.layers import DiTBlock, run_blocks, settle

    blocks = torch.nn.ModuleList(DiTBlock(32, 2, 2.0, 16, "math") for _ in range(3))
    perturb_(blocks, 0.2)  # gates and modulation away from their zero init
    x, c = torch.randn(2, 5, 32), torch.randn(2, 16)

    def modulate(t: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return layer_norm(t, (32,), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    expected = x
    for block in blocks:
        s_msa, c_msa, g_msa, s_mlp, c_mlp, g_mlp = block.adaLN_modulation(c).chunk(6, dim=-1)
        expected = expected + g_msa[:, None] * block.attn(modulate(expected, s_msa, c_msa))
        expected = expected + g_mlp[:, None] * block.mlp(modulate(expected, s_mlp, c_mlp))
    branch, stream = run_blocks(blocks, x, c, fused=False)
    assert branch is not None  # the last MLP branch is left for the next layer to add
    torch.testing.assert_close(settle(branch, stream), expected, rtol=1e-5, atol=1e-6)
