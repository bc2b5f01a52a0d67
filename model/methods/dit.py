"""DiT (Peebles & Xie 2023) trained with EDM: one denoising pass, loss on every token.

With mask_ratio > 0 the pass is a masked one: the encoder sees a random keep set of the
tokens and the decoder restores all of them (`masked_pass`). MaskDiT and SD-DiT build on
that pass (model/methods/maskdit.py, sddit.py).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from model.backbone import Backbone
from model.config import ModelConfig, fail, kept_tokens
from model.layers import kept_patch_weight
from model.methods.base import LossInputs, Method, Noised
from model.precond import sample_sigma


class MaskedPass(NamedTuple):
    sigma: torch.Tensor  # [B]
    noised: Noised
    ids_keep: torch.Tensor | None  # [B, K]; None: every token was encoded
    z: torch.Tensor  # [B, K, D] the encoder's output at the kept tokens
    F: torch.Tensor  # [B, C, H, W] the network output


class DiTLoss(Method):
    name = "DiT"

    @classmethod
    def preset(cls, size: str, depth: int, hidden: int) -> dict[str, Any]:
        return dict(mask_ratio=0.0, decoder_depth=0, lambda_dis=0.0, mae_weight=0.0)

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        require_off(config, cls.name, "lambda_dis", "mae_weight")

    def forward(self, backbone: Backbone, x0: torch.Tensor, y: torch.Tensor,
                inputs: LossInputs) -> dict[str, torch.Tensor]:
        p = self.masked_pass(backbone, x0, y, inputs.mask_ratio)
        gen = self.denoising_loss(p.F, x0, p.sigma, p.noised, self.generative_weight(p))
        return {"gen": gen, "loss": gen}

    def masked_pass(self, backbone: Backbone, x0: torch.Tensor, y: torch.Tensor,
                    mask_ratio: float, sigma_min: float | None = None) -> MaskedPass:
        """sigma = exp(P_mean + P_std N(0,1)) per sample, noise, label dropout, EDM views
        (and the sigma_min view), a keep set of L - round(r L) tokens when the step's
        ratio r > 0, and the backbone on it."""
        cfg = self.config
        B, device = x0.shape[0], x0.device
        sigma = sample_sigma(B, cfg.P_mean, cfg.P_std, device)  # [B]
        noised = self.add_noise(x0, y, sigma, sigma_min)
        ids_keep = None
        if mask_ratio > 0:
            ids_keep = self.keep_ids(B, kept_tokens(cfg.num_tokens, mask_ratio), device)
        z, F = self.run_backbone(backbone, noised, ids_keep)
        return MaskedPass(sigma, noised, ids_keep, z, F)

    def generative_weight(self, p: MaskedPass) -> torch.Tensor | None:
        """[B, L] 1 at the kept tokens when the loss covers only those (gen_loss_tokens =
        'kept', MaskDiT) and the pass was masked; None: every token."""
        if p.ids_keep is None or self.config.gen_loss_tokens != "kept":
            return None
        return kept_patch_weight(p.ids_keep, self.config.num_tokens)


def require_off(config: ModelConfig, method: str, *fields: str) -> None:
    """ValueError naming the first of `fields` (loss weights) that is not 0."""
    for field in fields:
        if getattr(config, field):
            fail(field, f"must be 0 for {method}, got {getattr(config, field)} (it weighs "
                 "another method's loss term)")
