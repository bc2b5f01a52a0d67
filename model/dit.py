"""The DiT backbone shared by SD-DiT, DiT and MaskDiT: F(x_in, c_noise, y), through the
stages of `model.backbone.Backbone` (embed, encode kept tokens, decode to all, final).

Tokens are patches plus a fixed sin-cos position. At masked positions the decoder starts
from the student's own noisy tokens (decoder_fill='noisy') or a learned mask token. The
decoder is either the last `decoder_depth` blocks of the depth at hidden width, or
(separate_decoder) extra blocks of decoder_width behind MaskDiT's `DecoderLayer`
(LayerNorm without affine, adaLN(c) shift/scale, Linear D -> decoder_width; adaLN and
Linear start at zero) and a fixed sin-cos decoder position embedding, as in the public
MaskDiT code (models/maskdit.py).
EDM preconditioning lives apart, in `model/precond.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from model.backbone import Backbone
from model.config import ModelConfig
from model.layers import (
    Branch,
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    modulate_norm,
    run_blocks,
    scatter_tokens,
    settle,
    sincos_pos_embed_2d,
    unpatchify,
)


class DecoderLayer(nn.Module):
    """MaskDiT's encoder -> decoder interface: Linear(adaLN(LayerNorm(z), c)), [B, T, D] ->
    [B, T, Dd]. `initialize_weights` zeroes the adaLN and the Linear, so at initialisation
    the decoder sees only what is added after it (mask token and position)."""

    def __init__(self, dim: int, decoder_dim: int) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.linear = nn.Linear(dim, decoder_dim)

    def forward(self, z: torch.Tensor, c: torch.Tensor, fused: bool) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 x [B, D]
        return self.linear(modulate_norm(z, shift, scale, fused))  # [B, T, Dd]


class DiTBackbone(Backbone):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        cfg = self.config = config
        D, Dd, grid = cfg.hidden_size, cfg.dec_width, cfg.input_size // cfg.patch_size
        self.fused = cfg.use_kernels
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        # Fixed, so a buffer: it is neither trained nor part of the EMA.
        self.register_buffer("pos_embed", sincos_pos_embed_2d(D, grid)[None], persistent=False)
        self.encoder = nn.ModuleList(
            DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, D, cfg.attention)
            for _ in range(cfg.encoder_depth))
        self.decoder = nn.ModuleList(
            DiTBlock(Dd, cfg.dec_heads, cfg.mlp_ratio, D, cfg.attention)
            for _ in range(cfg.decoder_depth))
        self.decoder_layer = DecoderLayer(D, Dd) if cfg.separate_decoder else None
        masked_fill = cfg.decoder_fill == "mask_token"
        self.mask_token = nn.Parameter(torch.zeros(Dd)) if masked_fill else None
        if cfg.separate_decoder or self.mask_token is not None:
            self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(Dd, grid)[None],
                                 persistent=False)
        else:
            self.decoder_pos_embed = None
        self.final_layer = FinalLayer(Dd, cfg.patch_size, cfg.in_channels, D)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """After xavier on every linear (`DiffusionTransformer.initialize_weights`): the patch
        embedding like a linear, label table and timestep MLP N(0, 0.02), adaLN-Zero, zero
        output layer, MaskDiT's zero decoder interface, mask token N(0, 0.02)."""
        w = self.x_embedder.proj.weight  # like a linear on the flattened patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in [*self.encoder, *self.decoder]:  # adaLN-Zero: every block starts as identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.decoder_layer is not None:  # MaskDiT: the decoder starts from mask token + position
            nn.init.zeros_(self.decoder_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.decoder_layer.adaLN_modulation[-1].bias)
            nn.init.zeros_(self.decoder_layer.linear.weight)
            nn.init.zeros_(self.decoder_layer.linear.bias)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def embed(self, x_in: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.x_embedder(x_in) + self.pos_embed  # [B, L, D]
        return tokens, self.t_embedder(c_noise) + self.y_embedder(y)  # c [B, D]

    def encode(self, tokens: torch.Tensor, c: torch.Tensor,
               ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """The tokens carry their positions already, so ids_keep is not needed here."""
        return settle(*run_blocks(self.encoder, tokens, c, self.fused))  # [B, T, D]

    def decode(self, z: torch.Tensor, c: torch.Tensor, ids_keep: torch.Tensor | None,
               tokens: torch.Tensor) -> tuple[Branch | None, torch.Tensor]:
        """z: encoder output [B, T, D] at ids_keep (T = L when ids_keep is None); tokens:
        the student view's token embeddings [B, L, D], the 'noisy' fill."""
        L = self.config.num_tokens
        if ids_keep is not None and self.mask_token is None:
            z = scatter_tokens(z, ids_keep, tokens, L, self.fused)  # [B, L, D]
            ids_keep = None
        if self.decoder_layer is not None:
            z = self.decoder_layer(z, c, self.fused)  # [B, T, Dd]
        if ids_keep is not None:  # mask-token fill
            z = scatter_tokens(z, ids_keep, self.mask_token, L, self.fused)  # [B, L, Dd]
        if self.decoder_pos_embed is not None:
            z = z + self.decoder_pos_embed  # mask tokens learn where they are from this
        return run_blocks(self.decoder, z, c, self.fused)  # [B, L, Dd], last add pending

    def final(self, branch: Branch | None, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        out = self.final_layer(branch, x, c, self.fused)  # [B, L, p*p*C]
        return unpatchify(out, cfg.patch_size, cfg.in_channels)  # [B, C, H, W]
