"""SD-DiT, DiT, MaskDiT and MDT: one loss class per method (model/methods/) over one
backbone interface (model/backbone.py), with EDM preconditioning and sampling. `METHODS`
lists the shipped methods in the chart's order; `register_method` adds one.

Layer: sdkernels <- **model** <- data <- train, metrics <- bench <- sddit. It imports torch
and sdkernels only; the network is written for one device (parallelism is applied from
outside, in train/distributed.py).

    net = model.build("SD-DiT-XL/2", use_kernels=True)
    losses = net.training_losses(x0, y)          # {"loss", "gen", "dis"}
    net.update_teacher(momentum)                 # the schedule's value (train/schedule.py)
    images = model.edm_sample(net, labels, seeds)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from model.attention import available_attention_backends
from model.backbone import Backbone
from model.config import ModelConfig
from model.flops import flops_per_image
from model.methods import (
    METHODS,
    LossInputs,
    Method,
    method_names,
    register_method,
    unregister_method,
)
from model.network import DiffusionTransformer
from model.presets import make_config
from model.sampler import edm_sample


def build(name: str, **overrides: Any) -> DiffusionTransformer:
    """A network from a preset name ('SD-DiT-XL/2', 'MaskDiT-B/4', 'DiT-tiny', ...) and
    config overrides; unknown override keys raise ValueError listing the valid fields."""
    return DiffusionTransformer(make_config(name, **overrides))


def _config(net_or_config: nn.Module | ModelConfig) -> ModelConfig:
    return net_or_config if isinstance(net_or_config, ModelConfig) else net_or_config.config


def encoder_patches(net_or_config: nn.Module | ModelConfig) -> int:
    """Number of tokens the (student) encoder sees per image in training, e.g. 205 for
    SD-DiT-XL/2 (mask ratio 0.2 of 256), 256 for DiT, 128 for MaskDiT; for MDT its masked
    pass's mean, 153 (it also runs an unmasked pass: `encoder_passes`)."""
    return _config(net_or_config).encoder_tokens


def encoder_passes(net_or_config: nn.Module | ModelConfig) -> tuple[int, ...]:
    """Encoder tokens of each forward of one training step: (205,) for SD-DiT-XL/2,
    (256, 153) for MDT (unmasked, then masked at the mean per-step ratio)."""
    return _config(net_or_config).encoder_passes


def attention_backend(net: nn.Module) -> str:
    return net.attention_backend


__all__ = [
    "METHODS",
    "Backbone",
    "DiffusionTransformer",
    "LossInputs",
    "Method",
    "ModelConfig",
    "attention_backend",
    "available_attention_backends",
    "build",
    "edm_sample",
    "encoder_passes",
    "encoder_patches",
    "flops_per_image",
    "make_config",
    "method_names",
    "register_method",
    "unregister_method",
]
