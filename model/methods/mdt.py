"""MDT (MDTv2; Gao et al. 2023) trained with EDM: two forwards per step on the MDT backbone
(model/mdt.py), as the public code's two `training_losses` calls share t.

One sigma per sample is shared by both passes; each draws its own noise and label
dropout. "gen" is the unmasked pass; "gen_masked" the masked one, whose ratio
r = mask_ratio + U(0, mask_ratio_jitter) is drawn once per step (torch's CPU generator, no
device sync) and keeps int(L (1 - r)) tokens per sample; the backbone's decode runs its
side-interpolater for that pass. The loss is their sum, over every token.
"""

from __future__ import annotations

from typing import Any

import torch

from model.backbone import Backbone
from model.config import ModelConfig, fail, mdt_kept_tokens
from model.methods.base import LossInputs, Method
from model.methods.dit import require_off
from model.precond import sample_sigma

# MDTv2's decoder depth ("decode_layer") in the public run scripts: 6 for S/2, 4 for XL/2.
MDT_DECODE_LAYERS = {"S": 6, "B": 6, "L": 4, "XL": 4, "tiny": 2}


@torch.compiler.disable  # a host-side draw: one graph break, no recompiles of the draw
def sample_num_kept(num_tokens: int, mask_ratio: float, jitter: float) -> int:
    """Tokens the masked pass keeps this step: int(L (1 - r)), r = mask_ratio +
    U(0, jitter), drawn from torch's CPU generator (seeded, checkpointed, and no device
    sync)."""
    return mdt_kept_tokens(num_tokens, mask_ratio + jitter * torch.rand(()).item())


class MDTLoss(Method):
    name = "MDT"

    @classmethod
    def preset(cls, size: str, depth: int, hidden: int) -> dict[str, Any]:
        return dict(backbone="mdt", mask_ratio=0.3, mask_ratio_jitter=0.2,
                    decoder_depth=MDT_DECODE_LAYERS[size], learned_pos_embed=True,
                    rel_pos_bias=True, lambda_dis=0.0, mae_weight=0.0, gen_loss_tokens="all")

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        require_off(config, cls.name, "lambda_dis", "mae_weight")
        if config.gen_loss_tokens != "all":
            fail("gen_loss_tokens", f"must be 'all' for {cls.name} (its loss covers every "
                 f"token), got {config.gen_loss_tokens!r}")

    def forward(self, backbone: Backbone, x0: torch.Tensor, y: torch.Tensor,
                inputs: LossInputs) -> dict[str, torch.Tensor]:
        cfg = self.config
        B, device = x0.shape[0], x0.device
        sigma = sample_sigma(B, cfg.P_mean, cfg.P_std, device)  # [B], shared by both passes
        losses = {}
        for name in ("gen", "gen_masked"):
            noised = self.add_noise(x0, y, sigma)
            ids_keep = None
            if name == "gen_masked":
                num_kept = sample_num_kept(cfg.num_tokens, inputs.mask_ratio,
                                           cfg.mask_ratio_jitter)
                ids_keep = self.keep_ids(B, num_kept, device)  # [B, K]
            _, F = self.run_backbone(backbone, noised, ids_keep)  # [B, C, H, W]
            losses[name] = self.denoising_loss(F, x0, sigma, noised)
        losses["loss"] = losses["gen"] + losses["gen_masked"]
        return losses
