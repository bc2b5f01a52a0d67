"""A method is a loss over the backbone interface: EDM's `loss(net, images, labels)` shape.

    losses = method(backbone, x0, y, inputs)     # {"loss": scalar, named parts ...}

`Method` is that callable (an nn.Module, so that it can own what it trains with, such as
SD-DiT's teacher and heads). It sees the network only through `model.backbone.Backbone`
(embed / encode kept tokens / decode to all / final layer), and the training side only
through `LossInputs` (the step's values from the schedule). A subclass sets `name`,
writes `forward`, and says with `preset` which config fields make a preset of it; the
registry (model/methods/__init__.py) maps the name in 'SD-DiT-XL/2' to the class.

The steps every denoising loss takes are methods here: `add_noise` (sigma given; noise,
label dropout, EDM preconditioning), `keep_ids` (a random keep set), `run_backbone`
(embed, encode the kept tokens, decode, final layer) and `denoising_loss` (EDM's loss).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from model.backbone import Backbone
from model.config import ModelConfig
from model.layers import drop_labels, gather_tokens, random_keep_ids
from model.precond import NoisyViews, edm_loss, precondition


@dataclass(frozen=True)
class LossInputs:
    """What a loss takes each step from outside the model. The model holds no notion of
    progress: the training schedule (train/schedule.py) computes the first two from the
    step and the config, and the training side supplies the reduction over ranks, so that
    model/ imports nothing distributed. Without a schedule, `defaults(config)`."""

    mask_ratio: float  # share of the tokens the masked encoder pass drops this step
    # SD-DiT's teacher temperature tau_t (a device scalar when the step is a CUDA graph).
    teacher_temperature: float | torch.Tensor
    # Mean of a statistic over data-parallel ranks (SD-DiT's centre); None: one process.
    mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def defaults(cls, config: ModelConfig) -> LossInputs:
        """The config's own values: mask_ratio, and tau_t at the start of its warm-up."""
        return cls(mask_ratio=config.mask_ratio, teacher_temperature=config.tau_t_start)


class Noised(NamedTuple):
    """One noising of a batch: what `add_noise` drew and computed."""

    noise: torch.Tensor  # [B, C, H, W]
    y: torch.Tensor  # [B] labels, some dropped to the null class
    views: NoisyViews  # x_noisy, x_in, c_noise (and the sigma_min view)


def _unmarked(phase: str) -> AbstractContextManager:
    return nullcontext()


class Method(nn.Module):
    """Base of the training methods' losses; see the module docstring."""

    name: ClassVar[str]  # as in preset names: '<name>-XL/2', '<name>-tiny'
    # The loss's functional parts (noise, mask, losses) run inside `phase_range(name)`. A
    # profiler sets it on one instance (`sddit profile`: record_function and NVTX ranges);
    # the default marks nothing and costs nothing. Module parts take forward hooks instead.
    phase_range: Callable[[str], AbstractContextManager] = staticmethod(_unmarked)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        type(self).check_config(config)
        self.config = config

    # ------------------------------------------------------------------ what a method says
    @classmethod
    def preset(cls, size: str, depth: int, hidden: int) -> dict[str, Any]:
        """Config fields that make this method's preset of a backbone size ('S', 'B', 'L',
        'XL' or 'tiny') with `depth` blocks of width `hidden`."""
        return {}

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        """ValueError naming a field this method cannot train with."""

    def forward(self, backbone: Backbone, x0: torch.Tensor, y: torch.Tensor,
                inputs: LossInputs) -> dict[str, torch.Tensor]:
        """x0 [B, C, H, W], y [B] -> {"loss": the scalar to backpropagate, named parts}."""
        raise NotImplementedError

    # ------------------------------------------------------------------ extra modules
    @torch.no_grad()
    def initialize_weights(self) -> None:
        """This method's own modules, after the network's xavier pass (one place:
        DiffusionTransformer.initialize_weights)."""

    def after_init(self, backbone: Backbone) -> None:
        """Called once the weights are initialised (SD-DiT copies its teacher then)."""

    def update_teacher(self, backbone: Backbone, momentum: float | torch.Tensor) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student; no teacher: nothing."""

    def teacher_pairs(self, backbone: Backbone) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(teacher tensor, the student tensor it averages) pairs; none without a teacher."""
        return []

    # ------------------------------------------------------------------ shared steps
    def add_noise(self, x0: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor,
                  sigma_min: float | None = None) -> Noised:
        """Noise n ~ N(0, I), labels dropped with p = class_dropout, and EDM's views of
        x0 + sigma n (with the sigma_min view from the same n when sigma_min is given)."""
        cfg = self.config
        noise = torch.randn_like(x0)  # [B, C, H, W]
        y = drop_labels(y, cfg.class_dropout, cfg.num_classes)  # [B]
        with self.phase_range("noise"):
            views = precondition(x0, noise, sigma, sigma_min, cfg.sigma_data, cfg.use_kernels)
        return Noised(noise, y, views)

    def keep_ids(self, batch: int, num_kept: int, device: torch.device) -> torch.Tensor:
        """A random keep set of num_kept tokens per sample, sorted: [B, K]."""
        with self.phase_range("mask"):
            return random_keep_ids(batch, self.config.num_tokens, num_kept, device)

    def run_backbone(self, backbone: Backbone, noised: Noised, ids_keep: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(z [B, K, D] the encoder's output at the kept tokens, F [B, C, H, W]): every
        token embedded, the kept ones (all when ids_keep is None) encoded, decoded back to
        every token, the final layer."""
        views = noised.views
        tokens, c = backbone.embed(views.x_in, views.c_noise, noised.y)  # [B, L, D], [B, D]
        kept = tokens
        if ids_keep is not None:
            with self.phase_range("mask"):
                kept = gather_tokens(tokens, ids_keep, backbone.fused)  # [B, K, D]
        z = backbone.encode(kept, c, ids_keep)  # [B, K, D]
        return z, backbone.final(*backbone.decode(z, c, ids_keep, tokens), c)

    def denoising_loss(self, F: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor,
                       noised: Noised, patch_weight: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """EDM's loss, the batch mean of lambda(sigma) |D - x0|^2 over every token, or the
        patches that patch_weight [B, L] weighs."""
        cfg = self.config
        with self.phase_range("losses"):
            return edm_loss(F, noised.views.x_noisy, x0, sigma, cfg.sigma_data, patch_weight,
                            cfg.patch_size, cfg.use_kernels).mean()
