"""The training schedule (train/schedule.py): one object gives each step's lr, EMA decay,
teacher momentum and the loss's inputs, from the step and the config alone, and the loop
hands exactly those values down to the loss."""

from __future__ import annotations

import pytest
import torch
from test_train import small_batches, tiny_config

import model
from train.config import EMAConfig, OptimConfig
from train.schedule import Schedule, cosine, ema_beta, learning_rate


def schedule_for(name: str, **overrides) -> Schedule:
    return Schedule(OptimConfig(), EMAConfig(), 8, model.make_config(name, **overrides))


def test_teacher_momentum_and_temperature_follow_the_model_fields() -> None:
    sd = schedule_for("SD-DiT-tiny")
    assert (sd.model_config.teacher_momentum_start, sd.model_config.teacher_momentum_end) == (
        0.996, 1.0)
    for step, momentum in [(0, 0.996), (50, 0.998), (100, 1.0)]:
        assert sd.at(step, 100).teacher_momentum == pytest.approx(momentum)
    for step, tau in [(0, 0.04), (5, 0.055), (10, 0.07), (80, 0.07)]:
        assert sd.at(step, 100).loss.teacher_temperature == pytest.approx(tau)
    custom = schedule_for("SD-DiT-tiny", teacher_momentum_start=0.9, teacher_momentum_end=0.99)
    for step, momentum in [(0, 0.9), (5, 0.945), (10, 0.99), (50, 0.99)]:  # past the plan: held
        assert custom.teacher_momentum(step, 10) == pytest.approx(momentum)
    assert cosine(5, 10, 0.9, 0.99) == pytest.approx(0.945)
    assert schedule_for("DiT-tiny").teacher_momentum(0, 10) == 1.0  # no teacher: harmless 1.0


def test_teacher_momentum_changes_the_teacher_update() -> None:
    from numerics import perturb_

    nets = [model.build("SD-DiT-tiny", depth=2, hidden_size=32, num_heads=2, **fields)
            for fields in ({}, {"teacher_momentum_start": 0.5})]
    nets[1].load_state_dict(nets[0].state_dict())
    name = "encoder.0.attn.qkv.weight"
    before = dict(nets[0].method.teacher.named_parameters())[name].clone()
    for net in nets:
        perturb_(net.backbone, seed=1)  # the same student step, away from the teacher
        schedule = Schedule(OptimConfig(), EMAConfig(), 8, net.config)
        net.update_teacher(schedule.at(0, 100).teacher_momentum)
    student = dict(nets[1].backbone.named_parameters())[name]
    for net, m in zip(nets, (0.996, 0.5), strict=True):
        torch.testing.assert_close(dict(net.method.teacher.named_parameters())[name],
                                   m * before + (1 - m) * student)


def test_lr_warmup_and_ema_half_life_match_their_forms() -> None:
    optim = OptimConfig(lr=1e-3, warmup_steps=4)
    assert [learning_rate(optim, k) for k in range(6)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    cfg = EMAConfig(half_life_kimg=10.0, rampup_ratio=0.0)
    assert ema_beta(cfg, 0, 10_000) == pytest.approx(0.5)  # one half-life per batch
    assert ema_beta(EMAConfig(half_life_kimg=10.0, rampup_ratio=0.5), 0, 8) == 0.0
    assert ema_beta(EMAConfig(decay=0.9999), 123, 8) == 0.9999
    ramp = Schedule(OptimConfig(), EMAConfig(half_life_kimg=10.0, rampup_ratio=0.5), 8,
                    model.make_config("DiT-tiny"))
    assert ramp.at(100, 1000).ema_beta == pytest.approx(0.5 ** (8 / (100 * 8 * 0.5)))


def test_values_are_a_pure_function_of_step_and_config() -> None:
    a, b = schedule_for("SD-DiT-tiny"), schedule_for("SD-DiT-tiny")
    for step in (0, 3, 17, 250):
        assert a.at(step, 300) == b.at(step, 300)  # what a resumed run recomputes
    assert a.at(3, 300).loss.mask_ratio == a.model_config.mask_ratio == 0.2


class RecordingNet(torch.nn.Module):
    """A tiny net that records the loss inputs each step hands it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(32 * 32, 1)
        self.seen: list[model.LossInputs] = []

    def training_losses(self, x: torch.Tensor, y: torch.Tensor, inputs: model.LossInputs
                        ) -> dict[str, torch.Tensor]:
        self.seen.append(inputs)
        loss = self.lin(x.flatten(1)).square().mean()
        return {"loss": loss}

    def update_teacher(self, momentum: float) -> None:
        pass


def test_the_loop_passes_each_steps_values_down_to_the_loss(tmp_path) -> None:
    from train.loop import train

    net = RecordingNet()
    cfg = tiny_config(tmp_path / "run", "schedule.total_steps=4")
    train(cfg, net=net, batches=small_batches())
    schedule = Schedule.from_config(cfg)
    assert net.seen == [schedule.at(k, 4).loss for k in range(4)]
    assert [i.teacher_temperature for i in net.seen] != [net.seen[0].teacher_temperature] * 4


def test_unmasked_finetune_switches_the_mask_ratio_at_its_step() -> None:
    """MaskDiT's second stage: the last N of total_steps at mask ratio 0, counted from the
    configured total (a time budget's plan does not move it)."""
    ft = Schedule(OptimConfig(), EMAConfig(), 8, model.make_config("MaskDiT-tiny"),
                  total_steps=100, unmasked_finetune_steps=5)
    assert ft.finetune_start == 95
    assert [ft.at(k, 100).loss.mask_ratio for k in (0, 94, 95, 99, 120)] == [
        0.5, 0.5, 0.0, 0.0, 0.0]
    assert ft.at(96, 50).loss.mask_ratio == 0.0 and ft.at(10, 50).loss.mask_ratio == 0.5
    assert schedule_for("MaskDiT-tiny").finetune_start is None


def test_unmasked_finetune_config_is_checked(tmp_path) -> None:
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="unmasked_finetune_steps.*total_steps"):
        tiny_config(tmp_path, "schedule.total_steps=4", "schedule.unmasked_finetune_steps=5")
    with pytest.raises(ConfigError, match="unmasked_finetune_steps"):
        tiny_config(tmp_path, "model.name='MDT-tiny'", "model.overrides={depth=4}",
                    "schedule.unmasked_finetune_steps=1")


def test_finetune_stage_trains_unmasked_and_resumes_exactly_across_the_switch(tmp_path
                                                                              ) -> None:
    """A MaskDiT run whose last 3 of 6 steps are unmasked: the MAE term is 0 from the
    switch on; 4 steps then a resume equals 6 straight, bit for bit."""
    from test_train import _assert_states_equal

    from train import checkpoint as ckpt
    from train.logging_utils import read_jsonl
    from train.loop import train

    sets = ("model.name='MaskDiT-tiny'", "schedule.total_steps=6", "schedule.ckpt_every=2",
            "schedule.unmasked_finetune_steps=3", "run.precision='fp32'")
    full = train(tiny_config(tmp_path / "full", *sets), batches=small_batches())
    rows = [r for r in read_jsonl(full.metrics) if r["event"] == "train"]
    assert [r["loss/mae"] > 0 for r in rows] == [True] * 3 + [False] * 3
    half = train(tiny_config(tmp_path / "split", *sets), batches=small_batches(), stop_after=4)
    assert half.step == 4  # one step past the switch at step 3
    resumed = train(tiny_config(tmp_path / "split", *sets), batches=small_batches(),
                    resume=True)
    a, b = ckpt.load_checkpoint(full.checkpoint), ckpt.load_checkpoint(resumed.checkpoint)
    for part in ("model", "ema", "optimizer"):
        _assert_states_equal(a[part], b[part], part)
