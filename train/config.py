"""Training configuration: dataclasses loaded from TOML, with dotted `--set a.b=v` overrides.

A config file is a TOML table per section (`[model]`, `[data]`, `[optim]`, ...). A file
may name a parent with a top-level `extends = "other.toml"` (resolved relative to the
file); the child's tables are merged over the parent's, key by key. Every key is checked
against the dataclasses: an unknown key is an error that names it and lists the valid
ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from train.data import DataConfig


@dataclass
class ModelConfig:
    name: str = "SD-DiT-tiny"
    # Passed to model.build(name, **overrides); the model rejects unknown keys.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # This many non-finite losses/gradients in a row stop the run.
    max_consecutive_nonfinite: int = 5


@dataclass
class ScheduleConfig:
    batch_size: int = 256  # global, over all ranks
    total_steps: int = 400_000
    max_minutes: float = 0.0  # wall-clock budget for this invocation; 0 = none
    log_every: int = 100
    sample_every: int = 0  # sample grid every N steps; 0 = only at the end
    ckpt_every: int = 10_000
    keep_last: int = 3
    sample_steps: int = 18  # Heun steps for the periodic grids
    sample_per_class: int = 8


@dataclass
class EMAConfig:
    # EDM form: beta = 0.5 ** (batch / half_life_images), with the half-life ramped up
    # as min(half_life, rampup_ratio * images_seen) early in training.
    half_life_kimg: float = 500.0
    rampup_ratio: float = 0.05  # 0 disables the ramp-up
    decay: float = 0.0  # > 0 uses a fixed per-step decay instead (e.g. 0.9999)


@dataclass
class DistributedConfig:
    strategy: Literal["ddp", "fsdp2"] = "ddp"
    find_unused_parameters: bool = False


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    activation_checkpointing: bool = False
    use_kernels: Literal["auto", "on", "off"] = "auto"  # auto: Triton on CUDA only
    progress_bar: bool = True
    tensorboard: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run: RunConfig = field(default_factory=RunConfig)


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclasses."""


# ----------------------------------------------------------------------------- reading


def _read_table(path: str, chain: tuple[str, ...] = ()) -> dict[str, Any]:
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError(f"config 'extends' cycle: {' -> '.join(chain + (path,))}")
    try:
        with open(path, "rb") as f:
            table = json.load(f) if path.endswith(".json") else tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot parse config {path}: {exc}") from exc
    parent = table.pop("extends", None)
    if parent is None:
        return table
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: 'extends' must be a file name, got {parent!r}")
    base = _read_table(os.path.join(os.path.dirname(path), parent), chain + (path,))
    return _merge(base, table)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """'a.b=v' -> (['a', 'b'], v) with v read as a TOML literal (bare words as strings)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set expects KEY.PATH=VALUE, got {item!r}")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # e.g. --set run.dir=runs/x
    return key.split("."), value


def apply_overrides(table: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    table = _merge({}, table)
    for item in overrides:
        path, value = parse_override(item)
        node = table
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a table")
            node = child
        node[path[-1]] = value
    return table


# ----------------------------------------------------------------------------- typing


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError("; ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} values, got {value!r}")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in pairs)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    raise ConfigError(f"{where}: unsupported config type {hint!r}")


def _build(cls: type, table: Any, where: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in table if k not in names]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        section = f"[{where}]" if where else "the top level"
        raise ConfigError(
            f"unknown config key {key!r}; valid keys in {section}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in table:
            kwargs[name] = _coerce(table[name], hints[name], f"{where}.{name}" if where else name)
    return cls(**kwargs)


def from_dict(table: dict[str, Any]) -> Config:
    cfg = _build(Config, table, "")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Reads a TOML (or saved JSON) config, applies `--set` overrides, validates."""
    table = _read_table(path) if path else {}
    return from_dict(apply_overrides(table, overrides or []))


def validate(cfg: Config) -> None:
    s = cfg.schedule
    positive = {
        "schedule.batch_size": s.batch_size,
        "schedule.total_steps": s.total_steps,
        "schedule.log_every": s.log_every,
        "schedule.keep_last": s.keep_last,
        "schedule.sample_steps": s.sample_steps,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    for key, value in {
        "schedule.ckpt_every": s.ckpt_every,
        "schedule.sample_every": s.sample_every,
        "schedule.max_minutes": s.max_minutes,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.grad_clip": cfg.optim.grad_clip,
        "ema.rampup_ratio": cfg.ema.rampup_ratio,
    }.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {cfg.optim.lr}")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise ConfigError(f"ema.decay must be in [0, 1), got {cfg.ema.decay}")
    if cfg.ema.decay == 0.0 and cfg.ema.half_life_kimg <= 0:
        raise ConfigError("ema.half_life_kimg must be positive when ema.decay is 0")
    if cfg.optim.max_consecutive_nonfinite <= 0:
        raise ConfigError("optim.max_consecutive_nonfinite must be positive")


def save_resolved(cfg: Config, run_dir: str) -> str:
    """Writes the fully resolved config as JSON; `--config run/config.json` reloads it."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(to_dict(cfg), f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path
