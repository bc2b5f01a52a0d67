"""MaskDiT (Zheng et al. 2023) trained with EDM: DiT's masked pass at ratio 0.5 with a
separate decoder behind its encoder -> decoder layer and mask tokens at the masked
positions, the EDM loss on the kept tokens only, and the MAE term on the masked ones.

At mask ratio 0 (the step's ratio comes from the schedule) the pass is unmasked and the
loss covers every token without the MAE term: MaskDiT's unmasked fine-tune.
"""

from __future__ import annotations

from typing import Any

import torch

from model.backbone import Backbone
from model.config import ModelConfig
from model.layers import kept_patch_weight
from model.methods.base import LossInputs
from model.methods.dit import DiTLoss, require_off
from model.precond import mae_loss

# MaskDiT's published decoder (XL/2 only): 8 blocks of width 512 with 16 heads of 32.
MASKDIT_XL = dict(hidden=1152, depth=28, decoder_width=512, decoder_depth=8, head_dim=32)


def maskdit_decoder(hidden: int, depth: int) -> dict[str, int]:
    """MaskDiT's decoder scaled with the backbone (assumed rule; XL exactly as published):
    width = hidden * 512/1152 (= hidden / 2.25) rounded to a multiple of the published head
    width 32, depth = 8 * depth/28 rounded, heads = width / 32. The decoder's share of the
    training FLOPs then stays near XL's (about 10%). S/2 and B/2: 3 blocks of 160 and 352."""
    xl = MASKDIT_XL
    head_dim = xl["head_dim"]
    width = max(head_dim, round(hidden * xl["decoder_width"] / xl["hidden"] / head_dim) * head_dim)
    dec_depth = max(1, round(xl["decoder_depth"] * depth / xl["depth"]))
    return dict(decoder_width=width, decoder_depth=dec_depth, decoder_num_heads=width // head_dim)


class MaskDiTLoss(DiTLoss):
    name = "MaskDiT"

    @classmethod
    def preset(cls, size: str, depth: int, hidden: int) -> dict[str, Any]:
        return dict(mask_ratio=0.5, separate_decoder=True, **maskdit_decoder(hidden, depth),
                    decoder_fill="mask_token", gen_loss_tokens="kept", lambda_dis=0.0,
                    mae_weight=0.1)

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        require_off(config, cls.name, "lambda_dis")

    def forward(self, backbone: Backbone, x0: torch.Tensor, y: torch.Tensor,
                inputs: LossInputs) -> dict[str, torch.Tensor]:
        cfg = self.config
        p = self.masked_pass(backbone, x0, y, inputs.mask_ratio)
        losses = {"gen": self.denoising_loss(p.F, x0, p.sigma, p.noised,
                                             self.generative_weight(p))}
        total = losses["gen"]
        if cfg.mae_weight > 0 and p.ids_keep is not None:
            masked = 1 - kept_patch_weight(p.ids_keep, cfg.num_tokens)  # [B, L]
            with self.phase_range("losses"):
                losses["mae"] = mae_loss(p.F, p.noised.views.x_noisy, p.sigma, cfg.sigma_data,
                                         masked, cfg.patch_size).mean()
            total = total + cfg.mae_weight * losses["mae"]
        elif cfg.mae_weight > 0:  # unmasked (fine-tune): no masked patch, the term is 0
            losses["mae"] = torch.zeros((), device=x0.device)  # same parts every step
        losses["loss"] = total
        return losses
