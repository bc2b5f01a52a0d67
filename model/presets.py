"""Named presets: '<method>-<size>/<patch>' (S/B/L/XL at patch 2, 4 or 8) or
'<method>-tiny' (CPU-sized, for 32x32 one-channel animal-mnist).

A preset is DiT's backbone size, then the fields the method's class gives for it
(`Method.preset`), then the caller's overrides; the method's class checks the result.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from model.config import ModelConfig
from model.methods import method_class, method_names

# DiT's sizes: (hidden_size, depth, num_heads).
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
PATCHES = (2, 4, 8)
# 256 tokens at patch 2, the sequence length of ImageNet-256 latents.
TINY = dict(input_size=32, in_channels=1, num_classes=10, patch_size=2, hidden_size=128,
            depth=6, num_heads=4, head_hidden_dim=256, head_bottleneck_dim=64, n_prototypes=512)


def _split(name: str) -> tuple[str, str] | None:
    """('SD-DiT', 'XL/2') from 'SD-DiT-XL/2': the longest registered method name that
    prefixes it (method names may contain '-')."""
    for method in sorted(method_names(), key=len, reverse=True):
        if name.startswith(method + "-"):
            return method, name[len(method) + 1:]
    return None


def preset(name: str) -> dict[str, Any]:
    """Config fields for a name like 'SD-DiT-XL/2', 'MaskDiT-B/4' or 'DiT-tiny'."""
    split = _split(name)
    size, _, patch = split[1].partition("/") if split else ("", "", "")
    if split is None or not (size == "tiny" and not patch or size in SIZES and patch.isdigit()):
        raise ValueError(
            f"unknown model name {name!r}: expected '<method>-<size>/<patch>' or '<method>-tiny' "
            f"with method in {method_names()}, size in {tuple(SIZES)}, patch in {PATCHES}")
    method = method_class(split[0])
    if size == "tiny":
        tiny = method.preset("tiny", TINY["depth"], TINY["hidden_size"])
        return {"method": method.name, **TINY, **tiny}
    if int(patch) not in PATCHES:
        raise ValueError(f"unknown patch size in {name!r}: expected one of {PATCHES}")
    hidden, depth, heads = SIZES[size]
    backbone = dict(method=method.name, patch_size=int(patch), hidden_size=hidden, depth=depth,
                    num_heads=heads)
    return {**backbone, **method.preset(size, depth, hidden)}


def make_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset's config with `overrides` (ValueError for an unknown field, or a value
    the config or the method cannot train with)."""
    valid = [f.name for f in dataclasses.fields(ModelConfig)]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ValueError(f"unknown model config field(s) {unknown}; valid fields: {valid}")
    fields = preset(name)
    if "method" in overrides and overrides["method"] != fields["method"]:
        raise ValueError(f"override method={overrides['method']!r} contradicts the name {name!r}")
    config = ModelConfig(**{**fields, **overrides})
    method_class(config.method).check_config(config)
    return config
