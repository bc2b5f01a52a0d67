"""The training loop on CPU: exact resume, NaN handling, run outputs, activation checkpointing.

Models are the tiny SD-DiT shrunk further (width 32, 2 blocks, patch 8 -> 16 tokens) so a
step takes milliseconds; data is real animal-mnist (or a 24-sample slice of it, so short
runs cross epoch boundaries)."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from train import checkpoint as ckpt
from train.config import load_config
from train.data import EpochSampler, TensorBatches
from train.logging_utils import read_jsonl
from train.loop import NonFiniteLossError, train

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.toml")
SMALL_MODEL = ("model.overrides={hidden_size=32, depth=2, num_heads=2, patch_size=8, "
               "head_hidden_dim=32, head_bottleneck_dim=16, n_prototypes=32}")


def tiny_config(run_dir, *sets: str):
    return load_config(CONFIG, [SMALL_MODEL, "schedule.batch_size=8", "schedule.total_steps=6",
                                "schedule.log_every=1", "schedule.ckpt_every=0",
                                "schedule.sample_steps=2", "schedule.sample_per_class=1",
                                "optim.warmup_steps=2", "ema.half_life_kimg=0.05",
                                "run.progress_bar=false", f"run.dir={json.dumps(str(run_dir))}",
                                *sets])


def small_batches(batch_size: int = 8, num: int = 24, seed: int = 0) -> TensorBatches:
    """24 real animal-mnist images: 3 steps per epoch at batch 8, with flips."""
    from train.data.animal_mnist import load_animal_mnist, to_model_range

    images, labels = load_animal_mnist("train")
    sampler = EpochSampler(num, batch_size, seed=seed, hflip=True)
    return TensorBatches(torch.from_numpy(to_model_range(images[:num])),
                         torch.from_numpy(labels[:num]), sampler, 10, torch.device("cpu"))


def _assert_states_equal(a: dict, b: dict, where: str = "") -> None:
    assert a.keys() == b.keys(), where
    for key in a:
        va, vb = a[key], b[key]
        if isinstance(va, dict):
            _assert_states_equal(va, vb, f"{where}.{key}")
        elif isinstance(va, torch.Tensor):
            assert torch.equal(va, vb), f"{where}.{key} differs"
        else:
            assert va == vb, f"{where}.{key}: {va} != {vb}"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_continues_bit_exactly(tmp_path, precision: str) -> None:
    sets = ("schedule.total_steps=8", "schedule.ckpt_every=4", f"run.precision='{precision}'")
    full = train(tiny_config(tmp_path / "full", *sets), batches=small_batches())
    half = train(tiny_config(tmp_path / "split", *sets), batches=small_batches(), stop_after=4)
    assert (full.step, half.step, half.stopped_by) == (8, 4, "stop_after")
    resumed = train(tiny_config(tmp_path / "split", *sets), batches=small_batches(),
                    resume=True)
    assert resumed.step == 8
    a, b = ckpt.load_checkpoint(full.checkpoint), ckpt.load_checkpoint(resumed.checkpoint)
    for part in ("model", "ema", "optimizer", "data"):  # 8 steps cross two epoch boundaries
        _assert_states_equal(a[part], b[part], part)
    assert a["data"] == {"epoch": 2, "position": 2}
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    assert "method.teacher.encoder.0.attn.qkv.weight" in a["model"] or any(
        k.startswith("method.teacher.") for k in a["model"])  # the teacher is checkpointed
    assert "method.center" in a["model"]


class NaNAt:
    """Wraps a batch source, putting NaN into the images of the chosen batch numbers."""

    def __init__(self, inner: TensorBatches, bad: set[int] | None) -> None:
        self.inner, self.bad, self.count = inner, bad, 0
        for name in ("num_samples", "in_channels", "resolution", "num_classes", "backend"):
            setattr(self, name, getattr(inner, name))

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for x, y in self.inner:
            if self.bad is None or self.count in self.bad:
                x = torch.full_like(x, float("nan"))
            self.count += 1
            yield x, y


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_loss_skips_the_step_and_is_logged(tmp_path, precision: str) -> None:
    result = train(tiny_config(tmp_path, "schedule.total_steps=4",
                               f"run.precision='{precision}'"),
                   batches=NaNAt(small_batches(), bad={1}))
    assert result.step == 4 and result.skipped_steps == 1
    records = read_jsonl(str(result.metrics))
    events = [r for r in records if r["event"] == "nonfinite"]
    assert len(events) == 1 and events[0]["step"] == 1 and math.isnan(events[0]["loss"])
    state = ckpt.load_checkpoint(result.checkpoint)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in state["ema"].values() if v.is_floating_point())


def test_repeated_nonfinite_losses_stop_with_a_clear_message(tmp_path) -> None:
    cfg = tiny_config(tmp_path, "optim.max_consecutive_nonfinite=3")
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite") as err:
        train(cfg, batches=NaNAt(small_batches(), bad=None))
    assert "optim.lr" in str(err.value)
    records = read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r["consecutive"] for r in records if r["event"] == "nonfinite"] == [1, 2, 3]


def test_run_writes_logs_grid_curve_and_keeps_last_checkpoints(tmp_path) -> None:
    cfg = tiny_config(tmp_path, "schedule.ckpt_every=2", "schedule.keep_last=2",
                      "schedule.sample_every=3", "schedule.log_every=2")
    result = train(cfg)  # the configured animal-mnist source
    assert result.step == 6 and result.stopped_by == "total_steps"
    records = read_jsonl(str(result.metrics))
    train_rows = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert {"loss", "loss/gen", "loss/dis", "grad_norm", "lr", "steps_per_s",
            "images_per_s"} <= train_rows[0].keys()
    assert all(math.isfinite(r["loss"]) for r in train_rows)
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [4, 6]
    for png in (tmp_path / "samples" / "step00000003.png", result.sample_grid,
                result.loss_curve):
        assert os.path.getsize(png) > 100
    from PIL import Image

    grid = Image.open(result.sample_grid)
    assert grid.height > grid.width  # one row per class (10), one sample per row
    assert json.loads(Path(tmp_path / "config.json").read_text())["schedule"]["batch_size"] == 8
    # tensorboard is a project dependency, so its event file must be there too.
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    net, meta = ckpt.load_sampling_model(str(tmp_path), "cpu")
    assert meta["step"] == 6 and not net.training
    assert torch.equal(net.state_dict()["backbone.final_layer.linear.weight"],
                       ckpt.load_checkpoint(result.checkpoint)["ema"][
                           "backbone.final_layer.linear.weight"])


def test_activation_checkpointing_gives_the_same_training(tmp_path) -> None:
    base = train(tiny_config(tmp_path / "a", "schedule.total_steps=2"), batches=small_batches())
    ac = train(tiny_config(tmp_path / "b", "schedule.total_steps=2",
                           "run.activation_checkpointing=true"), batches=small_batches())
    a, b = ckpt.load_checkpoint(base.checkpoint), ckpt.load_checkpoint(ac.checkpoint)
    assert a["model"].keys() == b["model"].keys()  # the wrapper leaves names alone
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)


def test_fused_optimizer_trains_like_the_three_torch_updates(tmp_path) -> None:
    """run.fused_optimizer='on' (one Triton pass: AdamW, teacher momentum, sampling EMA,
    through the interpreter here) lands where the torch optimizer + lerps do, skips a
    non-finite step on the device, and resumes. In fp32: under bf16 autocast the fused
    pass also keeps the teacher's bf16 shadow, which the torch path does not have."""
    sets = ("schedule.total_steps=4", "optim.weight_decay=0.01", "run.precision='fp32'")
    torch_run = train(tiny_config(tmp_path / "torch", *sets, "run.fused_optimizer='off'"),
                      batches=NaNAt(small_batches(), bad={2}))
    fused_run = train(tiny_config(tmp_path / "fused", *sets, "run.fused_optimizer='on'"),
                      batches=NaNAt(small_batches(), bad={2}))
    assert torch_run.skipped_steps == fused_run.skipped_steps == 1
    a, b = ckpt.load_checkpoint(torch_run.checkpoint), ckpt.load_checkpoint(fused_run.checkpoint)
    for part in ("model", "ema"):
        for key, value in a[part].items():
            if value.is_floating_point():
                torch.testing.assert_close(b[part][key], value, rtol=1e-5, atol=1e-6,
                                           msg=f"{part}.{key}")
    assert a["model"]["method.center"].ne(0).any()  # the teacher's centre moved, and agrees
    more = train(tiny_config(tmp_path / "fused", "schedule.total_steps=5",
                             "optim.weight_decay=0.01", "run.fused_optimizer='on'",
                             "run.precision='fp32'"),
                 batches=small_batches(), resume=True)
    assert more.step == 5
