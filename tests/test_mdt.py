"""MDT (MDTv2) as the fourth method: layout, parameters against the public code, masking,
side-interpolater, relative position bias, kernel path, FLOPs, and a tiny end-to-end run."""

from __future__ import annotations

import json
import os

import numerics
import numpy as np
import pytest
import torch
from numerics import measured_macs, model_batch
from test_eval_cli import random_reference

import model
import sdkernels
from model.flops import flops_per_image
from model.mdt import MDTBackbone, RelPosAttention, relative_position_index

# 16 tokens of width 64: 1 in-block, 1 out-block, 2 decoder blocks, the side block.
MICRO = dict(input_size=8, in_channels=2, num_classes=5, hidden_size=64, depth=4, num_heads=2,
             decoder_depth=2)


def micro(**overrides) -> model.DiffusionTransformer:
    return model.build("MDT-tiny", **{**MICRO, **overrides})


def perturb_(net: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    numerics.perturb_(net, scale, seed)


def batch(net, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return model_batch(net, n, seed=5)


# ----------------------------------------------------------------------------- structure
# Trainable parameters of the public MDTv2 (sail-sg/MDT, masked_diffusion/models.py,
# `MDTv2_<size>_2(input_size=32, mask_ratio=0.3, decode_layer=N)` as scripts/image_train.py
# builds it: 4 x 32 x 32 latents, 1,000 classes, learn_sigma=True), counted by instantiating
# that file. decode_layer: 6 for S/2 (run.sh), 4 for XL/2 (run_ddp_master.sh); B/2 has no
# public script and takes S/2's 6 (same depth 12).
PUBLIC_MDT = {"S/2": 38_454_872, "B/2": 152_112_272, "XL/2": 742_263_904}
# The same with learn_sigma=False: our EDM output has C, not 2C, channels.
PUBLIC_MDT_EPS_ONLY = {"S/2": 38_448_712, "B/2": 152_099_968, "XL/2": 742_245_456}


@pytest.mark.parametrize("size", list(PUBLIC_MDT))
def test_parameter_counts_match_public_mdtv2(size: str) -> None:
    with torch.device("meta"):
        net = model.build(f"MDT-{size}")
    count = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert abs(count - PUBLIC_MDT[size]) / PUBLIC_MDT[size] < 0.01
    assert count == PUBLIC_MDT_EPS_ONLY[size]  # every module matches; only the output differs


def test_presets_follow_the_public_run_scripts() -> None:
    s, xl = model.make_config("MDT-S/2"), model.make_config("MDT-XL/2")
    assert (s.decoder_depth, s.encoder_depth, xl.decoder_depth, xl.encoder_depth) == (6, 6, 4, 24)
    assert (xl.mask_ratio, xl.mask_ratio_jitter, xl.learned_pos_embed, xl.rel_pos_bias) == (
        0.3, 0.2, True, True)
    bb = MDTBackbone(model.make_config("MDT-tiny"))
    assert (len(bb.en_inblocks), len(bb.en_outblocks), len(bb.de_blocks), len(bb.sideblocks)) == (
        2, 2, 2, 1)
    assert [b.skip_linear is not None for b in bb.all_blocks()] == [False, False, True, True,
                                                                    False, True, True]
    assert model.METHODS == ("SD-DiT", "DiT", "MaskDiT", "MDT")
    assert model.encoder_passes(xl) == (256, 153) and model.encoder_patches(xl) == 153


def test_kept_count_distribution_is_the_public_one() -> None:
    cfg = model.make_config("MDT-XL/2")
    dist = dict(cfg.kept_distribution)
    assert min(dist) == 128 and max(dist) == 179  # int(256 (1 - r)), r in [0.3, 0.5)
    assert sum(dist.values()) == pytest.approx(1.0)
    assert dist[179] == pytest.approx(0.2 / 51.2)  # u in (179, 179.2]
    # Drawn per step: every sample of a step keeps the same count, counts vary across steps.
    net = micro()
    seen: list[int] = []
    net.backbone.en_inblocks[0].attn.register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape[1]))
    x0, y = batch(net)
    for _ in range(30):
        net.training_losses(x0, y)
    unmasked, masked = seen[0::2], seen[1::2]
    assert set(unmasked) == {16}
    assert set(masked) <= set(range(8, 12)) and len(set(masked)) > 1  # int(16 (1 - r))


@pytest.mark.parametrize("overrides, field", [
    (dict(decoder_depth=1), "decoder_depth"),  # odd encoder depth
    (dict(mask_ratio=0.0, mask_ratio_jitter=0.0), "mask_ratio"),
    (dict(mask_ratio_jitter=0.8), "mask_ratio_jitter"),
    (dict(lambda_dis=0.1), "lambda_dis"),
    (dict(mae_weight=0.1), "mae_weight"),
    (dict(attention="flash_attn"), "attention"),
    (dict(backbone="vit"), "backbone"),
])
def test_bad_mdt_configs_raise_clear_errors(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        micro(**overrides)


@pytest.mark.parametrize("field", ["rel_pos_bias", "learned_pos_embed", "mask_ratio_jitter"])
def test_mdt_fields_need_the_mdt_backbone(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        model.build("DiT-tiny", **{field: True if field != "mask_ratio_jitter" else 0.1})


# ----------------------------------------------------------------------------- losses
def test_two_losses_and_inference() -> None:
    net = micro()
    perturb_(net)  # off the zero init, so gradients reach every parameter
    x0, y = batch(net)
    losses = net.training_losses(x0, y)
    assert set(losses) == {"loss", "gen", "gen_masked"}
    torch.testing.assert_close(losses["loss"], losses["gen"] + losses["gen_masked"])
    losses["loss"].backward()
    grads = {n: p.grad for n, p in net.named_parameters()}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["backbone.mask_token"].abs().sum() > 0  # the masked pass trains it
    assert grads["backbone.pos_embed"].abs().sum() > 0  # learned positions
    out = net.denoise(x0.double(), torch.tensor(0.7), y, cfg_scale=1.5)
    assert out.shape == x0.shape and out.dtype == torch.float64
    assert model.attention_backend(net) == "sdpa"


def test_inference_skips_the_side_interpolater_and_draws_no_random_numbers() -> None:
    net = micro()
    perturb_(net)
    x, y = batch(net)
    state = torch.get_rng_state()
    out = net.denoise(x, 1.3, y)
    assert torch.equal(torch.get_rng_state(), state)
    net.backbone.sideblocks[0].register_forward_pre_hook(lambda *a: pytest.fail("side used"))
    with torch.no_grad():
        net.backbone.mask_token.add_(1.0)
    torch.testing.assert_close(net.denoise(x, 1.3, y), out, rtol=0, atol=0)


def test_side_interpolater_keeps_encoder_output_at_kept_tokens() -> None:
    net = micro()
    perturb_(net, 0.2)
    bb, L = net.backbone, net.config.num_tokens
    z = torch.randn(2, 10, 64)
    ids_keep = torch.stack([torch.randperm(L)[:10].sort().values for _ in range(2)])
    c = torch.randn(2, 64)
    side_in: list[torch.Tensor] = []
    bb.sideblocks[0].register_forward_pre_hook(lambda m, args: side_in.append(args[0].clone()))
    out = bb.side_interpolate(z, c, ids_keep)
    expected_in = bb.mask_token.expand(2, L, 64).clone()
    expected_in.scatter_(1, ids_keep[..., None].expand(-1, -1, 64), z)
    expected_in = expected_in + bb.decoder_pos_embed
    torch.testing.assert_close(side_in[0], expected_in)  # mask tokens + decoder positions
    side_out = bb.sideblocks[0](expected_in, c, bb.rel_index, False)
    kept = torch.zeros(2, L, dtype=torch.bool).scatter_(1, ids_keep, True)
    torch.testing.assert_close(out[kept], expected_in[kept])  # masked shortcut
    torch.testing.assert_close(out[~kept], side_out[~kept])


def test_relative_position_bias_matches_beit_and_is_gathered_at_kept_tokens() -> None:
    g = 4
    index = relative_position_index(g)
    for a in range(g * g):
        for b in range(g * g):
            (ya, xa), (yb, xb) = divmod(a, g), divmod(b, g)
            assert index[a, b] == (ya - yb + g - 1) * (2 * g - 1) + (xa - xb + g - 1)
    attn = RelPosAttention(32, 2, g, "math")
    torch.nn.init.normal_(attn.relative_position_bias_table)
    ids = torch.tensor([[0, 3, 5, 15], [1, 2, 8, 9]])
    kept = attn.bias(index[ids[:, :, None], ids[:, None, :]])  # [B, H, 4, 4]
    full = attn.bias(index)  # [H, 16, 16]
    for b in range(2):
        torch.testing.assert_close(kept[b], full[:, ids[b]][:, :, ids[b]])
    x = torch.randn(2, 4, 32)
    outputs, grads = {}, {}
    for backend in ("math", "sdpa"):
        attn.backend = backend
        attn.zero_grad()
        outputs[backend] = attn(x, index[ids[:, :, None], ids[:, None, :]])
        outputs[backend].square().sum().backward()
        grads[backend] = attn.relative_position_bias_table.grad.clone()
        assert attn.last_backend == backend
    torch.testing.assert_close(outputs["sdpa"], outputs["math"], rtol=1e-5, atol=1e-5)
    assert grads["math"].abs().sum() > 0  # the bias table trains, through either backend
    torch.testing.assert_close(grads["sdpa"], grads["math"], rtol=1e-4, atol=1e-6)


def test_kernel_path_matches_reference() -> None:
    ref = micro()
    perturb_(ref)
    fused = micro(use_kernels=True)
    fused.load_state_dict(ref.state_dict())
    x0, y = batch(ref)
    assert sdkernels.current_backend(x0) == "triton"
    numerics.assert_kernel_path_matches(ref, fused, x0, y)


# ----------------------------------------------------------------------------- FLOPs


def test_analytic_flops_count_both_passes_and_the_side_interpolater() -> None:
    # A fixed ratio (no jitter) so that one measured step is the expectation.
    net = model.build("MDT-tiny", attention="math", input_size=16, hidden_size=64, depth=6,
                      num_heads=2, mask_ratio=0.4, mask_ratio_jitter=0.0)
    assert flops_per_image(net, train=False) / 2 == measured_macs(net, train=False)
    measured = measured_macs(net, train=True)
    assert abs(flops_per_image(net, train=True) / 2 - measured) / measured < 0.005
    # Without the side block or the masked pass the count would be visibly lower.
    from model.flops import mdt_pass_macs

    cfg = net.config
    assert flops_per_image(cfg, train=True) / 2 == 3 * (mdt_pass_macs(cfg, None)
                                                         + mdt_pass_macs(cfg, cfg.num_kept))
    assert mdt_pass_macs(cfg, cfg.num_kept) > mdt_pass_macs(cfg, None) * 0.6


# ----------------------------------------------------------------------------- end to end
def test_tiny_mdt_trains_samples_and_is_scored(tmp_path) -> None:
    from sddit.cli import main as sddit
    from tests.test_train import small_batches, tiny_config
    from train import checkpoint as ckpt
    from train.loop import train

    cfg = tiny_config(tmp_path / "run", 'model.name="MDT-tiny"',
                      "model.overrides={hidden_size=32, depth=4, num_heads=2, patch_size=8, "
                      "decoder_depth=2}", "schedule.total_steps=3", "schedule.ckpt_every=3")
    result = train(cfg, batches=small_batches())
    assert result.step == 3
    state = ckpt.load_checkpoint(result.checkpoint)
    assert state["model_build"]["name"] == "MDT-tiny"
    net = ckpt.build_net(state["model_build"], torch.device("cpu"))
    assert net.config.backbone == "mdt"

    out = tmp_path / "samples"
    assert sddit(["sample", "--ckpt", str(tmp_path / "run"), "--num", "4", "--steps", "2",
                  "--out", str(out), "--device", "cpu"]) == 0
    npz = np.load(next(out.glob("*.npz")))
    assert npz["arr_0"].shape == (4, 32, 32, 1)

    ref = random_reference(tmp_path / "ref.npz")
    record_path = tmp_path / "eval" / "record.json"
    assert sddit(["eval", "--ckpt", str(tmp_path / "run"), "--num", "6", "--steps", "1",
                          "--batch-size", "3", "--ref", str(ref), "--out", str(record_path),
                          "--fid-method", "features", "--device", "cpu", "--no-progress"]) == 0
    record = json.loads(record_path.read_text())
    assert record["step"] == 3 and np.isfinite(record["fid"])
    assert os.path.isfile(record["grid"]) or record["grid"].endswith(".png")


def test_imagenet_configs_list_mdt() -> None:
    from train.config import load_config

    root = os.path.join(os.path.dirname(__file__), "..", "configs", "imagenet256")
    for tag, size in (("s2", "S"), ("b2", "B"), ("xl2", "XL")):
        cfg = load_config(os.path.join(root, f"mdt-{tag}.toml"))
        assert cfg.model.name == f"MDT-{size}/2" and cfg.data.source == "latents"
        assert cfg.schedule.batch_size == 256 and cfg.optim.grad_clip == 0
