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
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from train.data import DataConfig


@dataclass
class ModelSpec:
    """The [model] section: which network to build. Not model.ModelConfig (every field of
    the network), which model.build(name, **overrides) makes from it."""

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
    # MaskDiT's second stage (its public configs/finetune): the last N of total_steps train
    # at mask ratio 0 with the loss over every token; 0 = none (train/schedule.py).
    unmasked_finetune_steps: int = 0


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
    # auto: bf16 autocast on CUDA; on CPU bf16 where a bf16 matmul measures >= 1.25x fp32
    # (bf16 matrix units), else fp32 (train/execution.py)
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # auto: on CPU, torch.compile when the run is long enough to repay it (>= 400 steps);
    # CUDA stays eager unless "on". true/false are read as "on"/"off".
    compile: Literal["auto", "on", "off"] | bool = "auto"
    threads: int = 0  # CPU intra-op threads; 0: the default, or fewer if measured faster
    activation_checkpointing: bool = False
    use_kernels: Literal["auto", "on", "off"] = "auto"  # auto: Triton on CUDA only
    # One multi-tensor pass for AdamW, the teacher momentum and the sampling EMA
    # (train/fused_optim.py); auto: on CUDA for SD-DiT-style nets without FSDP2.
    fused_optimizer: Literal["auto", "on", "off"] = "auto"
    # Capture the whole step as one CUDA graph (train/graphs.py says where that holds).
    cuda_graphs: bool = False
    progress_bar: bool = True
    tensorboard: bool = True


@dataclass
class Config:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run: RunConfig = field(default_factory=RunConfig)


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclasses."""


class UsageError(ConfigError):
    """A command-line argument out of its range (the CLI exits 2 with the message)."""


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


def compile_mode(value: Any) -> str:
    """run.compile as "auto" | "on" | "off" (true/false, as older configs wrote it, are
    "on"/"off")."""
    if value is True:
        return "on"
    if value is False:
        return "off"
    if value in ("auto", "on", "off"):
        return value
    raise ConfigError(f"run.compile must be 'auto', 'on' or 'off' (or true/false), got "
                      f"{value!r}")


def from_dict(table: dict[str, Any]) -> Config:
    cfg = _build(Config, table, "")
    cfg.run.compile = compile_mode(cfg.run.compile)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Reads a TOML (or saved JSON) config, applies `--set` overrides, validates."""
    table = _read_table(path) if path else {}
    return from_dict(apply_overrides(table, overrides or []))


def _non_finite_fields(node: Any, where: str = "") -> list[str]:
    """Dotted names of float fields holding nan or inf, anywhere in the config."""
    found = []
    for f in dataclasses.fields(node):
        value, name = getattr(node, f.name), f"{where}{f.name}"
        if dataclasses.is_dataclass(value):
            found += _non_finite_fields(value, name + ".")
        values = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            found.append(name)
    return found


def _check_ranges(cfg: Config) -> None:
    s, o, e = cfg.schedule, cfg.optim, cfg.ema
    for key, value in {
        "schedule.batch_size": s.batch_size, "schedule.total_steps": s.total_steps,
        "schedule.log_every": s.log_every, "schedule.keep_last": s.keep_last,
        "schedule.sample_steps": s.sample_steps, "schedule.sample_per_class": s.sample_per_class,
        "optim.lr": o.lr, "optim.eps": o.eps,
        "optim.max_consecutive_nonfinite": o.max_consecutive_nonfinite,
    }.items():
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {value}")
    for key, value in {
        "schedule.ckpt_every": s.ckpt_every, "schedule.sample_every": s.sample_every,
        "schedule.max_minutes": s.max_minutes, "optim.warmup_steps": o.warmup_steps,
        "optim.grad_clip": o.grad_clip, "optim.weight_decay": o.weight_decay,
        "ema.rampup_ratio": e.rampup_ratio, "run.seed": cfg.run.seed,
        "run.threads": cfg.run.threads,
        "schedule.unmasked_finetune_steps": s.unmasked_finetune_steps,
    }.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    for i, beta in enumerate(o.betas):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"optim.betas[{i}] must be in [0, 1), got {beta}")
    if not 0.0 <= e.decay < 1.0:
        raise ConfigError(f"ema.decay must be in [0, 1), got {e.decay}")
    if e.decay == 0.0 and e.half_life_kimg <= 0:
        raise ConfigError("ema.half_life_kimg must be positive when ema.decay is 0")
    if s.unmasked_finetune_steps > s.total_steps:
        raise ConfigError(f"schedule.unmasked_finetune_steps ({s.unmasked_finetune_steps}) "
                          f"must not exceed schedule.total_steps ({s.total_steps})")
    if cfg.run.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"run.device must be 'auto', 'cpu' or 'cuda', got {cfg.run.device!r}")
    if not cfg.run.dir:
        raise ConfigError("run.dir must name a folder")


def _check_model(cfg: Config) -> None:
    """The model name and overrides, as model.build will see them (the data's shape is
    added at build time)."""
    import model

    overrides = dict(cfg.model.overrides)
    overrides.pop("use_kernels", None)  # refused later with its own message
    try:
        config = model.make_config(cfg.model.name, **overrides)
    except (ValueError, TypeError, KeyError) as exc:
        raise ConfigError(f"model ({cfg.model.name!r} with overrides {overrides}): {exc}"
                          ) from None
    if cfg.schedule.unmasked_finetune_steps and config.mask_ratio_jitter > 0:
        raise ConfigError(f"schedule.unmasked_finetune_steps: {cfg.model.name} draws its "
                          "masked pass's ratio each step (MDT) and has no unmasked stage; "
                          "set it to 0")


def validate(cfg: Config) -> None:
    """Every field, before any work: a ConfigError names the first bad one."""
    bad = _non_finite_fields(cfg)
    if bad:
        raise ConfigError(f"{bad[0]} must be a finite number, got "
                          f"{_get(cfg, bad[0])!r}")
    _check_ranges(cfg)
    try:
        cfg.data.validate(check_paths=False)  # train() checks the path before any work
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _check_model(cfg)


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def save_resolved(cfg: Config, run_dir: str, step: int = 0) -> str:
    """Writes the fully resolved config as JSON; `--config run/config.json` reloads it. A
    different config.json already there (a resume with changes) is kept as
    config-until-step<step>.json, so the run's history of settings is never lost."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, "config.json")
    text = json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n"
    if os.path.isfile(path):
        with open(path) as f:
            previous = f.read()
        if previous == text:
            return path
        os.replace(path, os.path.join(run_dir, f"config-until-step{step:08d}.json"))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return path
