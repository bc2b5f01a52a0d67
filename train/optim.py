"""The optimizer: AdamW (torch's fused, apex FusedAdam, or the one-pass FusedAdamWEMA).
Its learning rate per step comes from the training schedule (train/schedule.py)."""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from train.config import OptimConfig


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    """apex FusedAdam (adam_w_mode) when importable on CUDA, else torch's fused AdamW (CPU
    and CUDA), whose `found_inf` lets the training step skip a bad step on the device."""
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if device.type == "cuda" and importlib.util.find_spec("apex") is not None:
        try:
            from apex.optimizers import FusedAdam
        except ImportError:  # the unrelated PyPI "apex", or a broken build
            pass
        else:
            return FusedAdam(params, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(params, fused=True, **kwargs)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def wants_fused_optimizer(mode: str, device: torch.device, net: nn.Module, sharded: bool
                          ) -> bool:
    """run.fused_optimizer: 'auto' takes the one-pass optimizer (train/fused_optim.py) on
    CUDA for nets from model.build, never under FSDP2 (it needs plain tensors)."""
    if mode == "off":
        return False
    if sharded:
        if mode == "on":
            from train.config import ConfigError

            raise ConfigError("run.fused_optimizer='on' does not work with FSDP2 (sharded "
                              "parameters); use 'auto' or 'off'")
        return False
    return mode == "on" or (device.type == "cuda" and hasattr(net, "config"))


def build_fused_optimizer(net: nn.Module, ema_module: nn.Module, cfg: OptimConfig,
                          teacher_shadow: bool) -> torch.optim.Optimizer:
    """AdamW + teacher momentum + sampling EMA in one pass over each tensor."""
    from train.fused_optim import FusedAdamWEMA, sddit_pairs

    teacher_pairs, ema_pairs = sddit_pairs(net, ema_module)
    return FusedAdamWEMA([p for p in net.parameters() if p.requires_grad], lr=cfg.lr,
                         betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay,
                         teacher_pairs=teacher_pairs, ema_pairs=ema_pairs,
                         teacher_shadow=teacher_shadow)
