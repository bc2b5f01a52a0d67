"""The backbone interface: the one set of stages every training loss runs a network through.

A backbone is EDM's F(x_in, c_noise, y), split into four stages so that a loss can run
the encoder on a chosen subset of tokens and decode back to all of them:

    embed   x_in [B, C, H, W], c_noise [B], y [B] -> tokens [B, L, D], c [B, D]
    encode  tokens [B, T, D], c, ids_keep [B, T] | None -> z [B, T, D]
            (tokens: the embedded tokens at ids_keep, or all L when ids_keep is None)
    decode  z, c, ids_keep, tokens [B, L, D] -> (branch, x): the decoder's output over all
            L tokens, its last residual add still pending (`model.layers.Branch`)
    final   branch, x, c -> F [B, C, H, W] (the final adaLN layer, fused with that add)

`forward` (inference) runs the four on every token. `model/dit.py` (DiT, MaskDiT's
separate decoder) and `model/mdt.py` (MDTv2) implement it with the same signatures, so a
loss written against it runs on either.
"""

from __future__ import annotations

import torch
from torch import nn

from model.config import ModelConfig
from model.layers import Branch


class Backbone(nn.Module):
    config: ModelConfig
    fused: bool  # the sdkernels ops (True) or their torch references
    pos_embed: torch.Tensor  # [1, L, D], added by embed (SD-DiT's teacher adds it too)

    def embed(self, x_in: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def encode(self, tokens: torch.Tensor, c: torch.Tensor,
               ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor, c: torch.Tensor, ids_keep: torch.Tensor | None,
               tokens: torch.Tensor) -> tuple[Branch | None, torch.Tensor]:
        raise NotImplementedError

    def final(self, branch: Branch | None, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Inference: every token through encoder and decoder, no mask."""
        tokens, c = self.embed(x_in, c_noise, y)  # [B, L, D], [B, D]
        return self.final(*self.decode(self.encode(tokens, c), c, None, tokens), c)
