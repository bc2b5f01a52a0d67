"""Methods as loss classes: a fifth method added through the public interface only trains
end to end on either backbone, the registry refuses what it cannot build, and a state dict
saved before the methods became loss objects still loads."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator

import pytest
import torch
from numerics import model_batch, perturb_

import model

MICRO = dict(input_size=8, in_channels=2, num_classes=5, hidden_size=32, num_heads=2)


class HalfTokens(model.Method):
    """A toy fifth method, written only against model.Method and the backbone interface:
    the encoder sees the first half of the tokens (by raster order) at sigma = 1, the
    decoder restores all of them, and the loss is the plain squared error of D."""

    name = "HalfTokens"

    @classmethod
    def preset(cls, size: str, depth: int, hidden: int) -> dict:
        return dict(mask_ratio=0.5, decoder_depth=2, lambda_dis=0.0, mae_weight=0.0)

    def forward(self, backbone: model.Backbone, x0: torch.Tensor, y: torch.Tensor,
                inputs: model.LossInputs) -> dict[str, torch.Tensor]:
        B, L = x0.shape[0], self.config.num_tokens
        sd = self.config.sigma_data
        sigma = torch.ones(B, device=x0.device)  # [B]
        x_noisy = x0 + torch.randn_like(x0)  # [B, C, H, W]
        tokens, c = backbone.embed(x_noisy / math.sqrt(1 + sd**2), sigma.log() / 4, y)
        keep = L - round(inputs.mask_ratio * L)
        ids = torch.arange(keep, device=x0.device).expand(B, keep)  # [B, K]
        z = backbone.encode(tokens[:, :keep], c, ids)  # [B, K, D]
        F = backbone.final(*backbone.decode(z, c, ids, tokens), c)  # [B, C, H, W]
        D = (sd**2 * x_noisy + sd * F) / (1 + sd**2)  # EDM's D at sigma = 1
        loss = (D - x0).square().mean()
        return {"loss": loss, "recon": loss.detach()}


@pytest.fixture
def half_tokens() -> Iterator[type[model.Method]]:
    model.register_method(HalfTokens)
    try:
        yield HalfTokens
    finally:
        model.unregister_method(HalfTokens.name)


@pytest.mark.parametrize("backbone, depth", [("dit", 3), ("mdt", 4)])
def test_a_fifth_method_registers_and_trains_on_either_backbone(half_tokens, backbone: str,
                                                                depth: int) -> None:
    assert "HalfTokens" in model.method_names() and "HalfTokens" not in model.METHODS
    net = model.build("HalfTokens-tiny", backbone=backbone, depth=depth, **MICRO)
    assert isinstance(net.method, HalfTokens) and net.config.mask_ratio == 0.5
    perturb_(net, 0.05, seed=0)
    x0, y = model_batch(net, 3, seed=1)
    losses = net.training_losses(x0, y)
    assert set(losses) == {"loss", "recon"} and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(p.grad is not None for p in net.backbone.parameters() if p.requires_grad)
    half = net.training_losses(x0, y, model.LossInputs(mask_ratio=0.25, teacher_temperature=1.0))
    assert torch.isfinite(half["loss"])  # the step's ratio is an input, not the config's
    assert net.denoise(x0, 0.5, y).shape == x0.shape  # inference is the backbone's own
    net.update_teacher(0.5)  # no teacher: nothing to do


def test_a_fifth_method_trains_through_the_loop_and_checkpoints(half_tokens, tmp_path) -> None:
    from test_train import small_batches, tiny_config

    from train import checkpoint as ckpt
    from train.loop import train

    cfg = tiny_config(tmp_path / "run", 'model.name="HalfTokens-tiny"',
                      "model.overrides={hidden_size=32, depth=3, num_heads=2, patch_size=8}",
                      "schedule.total_steps=2", "schedule.ckpt_every=2")
    result = train(cfg, batches=small_batches())
    assert result.step == 2 and math.isfinite(result.final_loss)
    state = ckpt.load_checkpoint(result.checkpoint)
    assert isinstance(ckpt.build_net(state["model_build"], torch.device("cpu")).method,
                      HalfTokens)


def test_the_registry_refuses_what_it_cannot_build(half_tokens) -> None:
    with pytest.raises(ValueError, match="already registered"):
        model.register_method(HalfTokens)
    with pytest.raises(TypeError, match="Method subclass"):
        model.register_method(dict)
    with pytest.raises(ValueError, match="built-in"):
        model.unregister_method("DiT")
    with pytest.raises(ValueError, match="model name"):
        model.build("Nope-tiny")
    with pytest.raises(ValueError, match="method must be one of"):
        model.DiffusionTransformer(model.ModelConfig(method="Nope"))


@pytest.mark.parametrize("name, field", [("DiT-tiny", "lambda_dis"), ("DiT-tiny", "mae_weight"),
                                         ("MaskDiT-tiny", "lambda_dis"),
                                         ("SD-DiT-tiny", "mae_weight")])
def test_a_method_refuses_another_methods_loss_weight(name: str, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        model.build(name, **{field: 0.1})


def test_a_state_dict_from_before_the_loss_objects_loads() -> None:
    """Before, SD-DiT's head, teacher and centre sat at the network's top level; the keys
    recorded then (tests/pinned) map onto today's, and such a state dict loads strictly."""
    net = model.build("SD-DiT-tiny", depth=3, decoder_depth=1, **MICRO)
    perturb_(net, 0.05, seed=0)
    legacy = {k.removeprefix("method."): v for k, v in net.state_dict().items()}
    assert {"head.prototypes", "center", "teacher.head.prototypes"} <= legacy.keys()
    fresh = model.build("SD-DiT-tiny", depth=3, decoder_depth=1, **MICRO)
    fresh.load_state_dict(legacy)
    for key, value in net.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key

    from model.network import upgrade_state_dict

    with open(os.path.join(os.path.dirname(__file__), "pinned", "step_values.json")) as f:
        recorded = json.load(f)["SD-DiT"]["reference"]["grads"]  # old trainable names
    names = dict.fromkeys(recorded)
    assert set(upgrade_state_dict(names)) == {n for n in recorded if not n.startswith("backbone.")}
    pinned_net = model.build("SD-DiT-tiny", input_size=8, in_channels=2, num_classes=5,
                             hidden_size=64, depth=3, num_heads=2, head_hidden_dim=32,
                             head_bottleneck_dim=16, n_prototypes=24, decoder_depth=1)
    assert set(names) == {n for n, p in pinned_net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["SD-DiT-tiny", "MaskDiT-tiny"])
def test_the_loss_traces_as_one_graph_and_the_warmup_does_not_recompile(name: str) -> None:
    """torch.compile(fullgraph=True) of the plain-torch loss: no graph break, and the
    teacher temperature the schedule moves every step costs at most one recompile (the
    one that makes it dynamic). Traced with dynamo's eager backend: no codegen needed."""
    graphs: list[object] = []

    def count(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    net = model.build(name, depth=3, decoder_depth=1, head_hidden_dim=16, head_bottleneck_dim=8,
                      n_prototypes=16, **MICRO, **({"decoder_width": 32}
                                                   if name.startswith("MaskDiT") else {}))
    x0, y = model_batch(net, 2, seed=0)
    loss = torch.compile(net.training_losses, fullgraph=True, backend=count)
    buffers = [b for b in net.buffers() if b.is_floating_point()]  # SD-DiT's centre moves
    for tau in (0.04, 0.045, 0.05, 0.055):
        inputs = model.LossInputs(mask_ratio=net.config.mask_ratio, teacher_temperature=tau)
        before = [b.clone() for b in buffers]
        torch.manual_seed(1)
        compiled = loss(x0, y, inputs)
        after = [b.clone() for b in buffers]
        torch._foreach_copy_(buffers, before)
        torch.manual_seed(1)
        eager = net.training_losses(x0, y, inputs)
        for key, value in eager.items():
            torch.testing.assert_close(compiled[key], value, msg=key)
        for a, b in zip(after, buffers, strict=True):
            torch.testing.assert_close(a, b)
    assert 1 <= len(graphs) <= 2, f"{len(graphs)} graphs for 4 temperatures"
    torch._dynamo.reset()
