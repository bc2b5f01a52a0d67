"""Training config: TOML + `extends`, dotted --set overrides, unknown keys rejected."""

import json
import os
import re
from pathlib import Path

import pytest

from train.config import ConfigError, load_config, parse_override, save_resolved

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
CONFIG = os.path.join(CONFIG_DIR, "tiny.toml")


def test_set_values_are_toml_literals() -> None:
    assert parse_override("optim.lr=2e-4") == (["optim", "lr"], 2e-4)
    assert parse_override("schedule.total_steps=12") == (["schedule", "total_steps"], 12)
    assert parse_override("run.compile=true") == (["run", "compile"], True)
    assert parse_override("optim.betas=[0.9, 0.95]") == (["optim", "betas"], [0.9, 0.95])
    assert parse_override('run.dir="a b"') == (["run", "dir"], "a b")
    assert parse_override("run.dir=runs/x") == (["run", "dir"], "runs/x")  # bare word
    assert parse_override("model.overrides={mask_ratio=0.5}")[1] == {"mask_ratio": 0.5}
    for bad in ("optim.lr", "=3", "optim..lr=1"):
        with pytest.raises(ConfigError, match="--set"):
            parse_override(bad)


def test_overrides_apply_and_coerce(tmp_path) -> None:
    cfg = load_config(os.path.join(CONFIG_DIR, "tiny.toml"),
                      ["optim.lr=3e-4", "optim.betas=[0.9, 0.95]", "ema.half_life_kimg=7",
                       "model.overrides.mask_ratio=0.3", f"run.dir={tmp_path}"])
    assert cfg.optim.lr == 3e-4
    assert cfg.optim.betas == (0.9, 0.95)
    assert cfg.ema.half_life_kimg == 7.0 and isinstance(cfg.ema.half_life_kimg, float)
    assert cfg.model.overrides["mask_ratio"] == 0.3
    assert cfg.model.name == "SD-DiT-tiny"
    path = save_resolved(cfg, str(tmp_path))
    assert json.loads(Path(path).read_text())["optim"]["lr"] == 3e-4
    assert load_config(path) == cfg  # the saved config reloads to the same thing


@pytest.mark.parametrize("item, key", [
    ("optim.lrr=1", "optim.lrr"),
    ("nosuch.x=1", "nosuch"),
    ("data.resolutoin=32", "data.resolutoin"),
])
def test_unknown_set_key_is_rejected_with_valid_keys(item: str, key: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'") as err:
        load_config(None, [item])
    assert "valid keys" in str(err.value)


def test_unknown_toml_key_is_rejected(tmp_path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[schedule]\nbatch_size = 8\ntotal_step = 3\n')
    with pytest.raises(ConfigError, match="'schedule.total_step'.*total_steps"):
        load_config(str(path))


def test_wrong_types_and_values_are_rejected() -> None:
    with pytest.raises(ConfigError, match="schedule.batch_size must be an integer"):
        load_config(None, ["schedule.batch_size=1.5"])
    with pytest.raises(ConfigError, match="run.precision must be one of"):
        load_config(None, ["run.precision='fp8'"])
    with pytest.raises(ConfigError, match="optim.lr must be positive"):
        load_config(None, ["optim.lr=0"])
    with pytest.raises(ConfigError, match="optim.betas must be a list of 2"):
        load_config(None, ["optim.betas=[0.9]"])


def test_extends_merges_and_detects_cycles(tmp_path) -> None:
    (tmp_path / "base.toml").write_text('[optim]\nlr = 1e-3\nwarmup_steps = 5\n'
                                        '[schedule]\nbatch_size = 16\n')
    (tmp_path / "child.toml").write_text('extends = "base.toml"\n[optim]\nlr = 2e-3\n')
    cfg = load_config(str(tmp_path / "child.toml"))
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.schedule.batch_size) == (2e-3, 5, 16)
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.toml"))


def test_every_preset_loads_and_names_a_model() -> None:
    import model

    names = sorted(os.path.relpath(os.path.join(root, f), CONFIG_DIR)
                   for root, _, files in os.walk(CONFIG_DIR) for f in files
                   if f.endswith(".toml") and not f.startswith("_"))
    assert "tiny.toml" in names
    presets = {}
    for name in names:
        cfg = load_config(os.path.join(CONFIG_DIR, name))
        model.make_config(cfg.model.name, **cfg.model.overrides)  # names and overrides valid
        presets[name] = cfg
    paper = [c for n, c in presets.items() if c.data.source == "latents"]
    # SD-DiT, DiT and MaskDiT at S/2, B/2 and XL/2, batch 256 global.
    assert {c.model.name for c in paper} >= {f"{m}-{s}/2" for m in ("SD-DiT", "DiT", "MaskDiT")
                                             for s in ("S", "B", "XL")}
    assert all(c.schedule.batch_size == 256 for c in paper)


@pytest.mark.parametrize("override, message", [
    ("model.overrides={mask_ratio=1.0}", "mask_ratio must be in"),
    ("model.name='SD-DiT-Q/3'", "unknown model name"),
    ("optim.lr=nan", "optim.lr must be a finite number"),
    ("optim.lr=inf", "optim.lr must be a finite number"),
    ("optim.betas=[0.9, 1.0]", r"optim.betas\[1\] must be in \[0, 1\)"),
    ("optim.eps=0", "optim.eps must be positive"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("schedule.sample_per_class=0", "schedule.sample_per_class must be positive"),
    ("schedule.max_minutes=inf", "schedule.max_minutes must be a finite number"),
    ("data.num_workers=-1", "data.num_workers must be an int >= 0"),
    ("data.source='image-folder'", "data.path is required"),
    ("ema.decay=1.0", r"ema.decay must be in \[0, 1\)"),
    ("run.device='tpu'", "run.device must be"),
])
def test_every_field_is_checked_before_any_work(override, message, capsys) -> None:
    from sddit.cli import main

    assert main(["train", "--config", CONFIG, "--set", override]) == 2
    err = capsys.readouterr().err
    assert "config error:" in err and "Traceback" not in err
    assert re.search(message, err), err
