"""MDT (Masked Diffusion Transformer v2; Gao et al. 2023) as a backbone of this network.

Read from the public code (sail-sg/MDT, masked_diffusion/models.py, class MDTv2):
    tokens = x_embedder(x) + pos_embed                     learned, from 2-D sin-cos
    en_in:  depth_e/2 blocks, each output kept as a skip   (depth_e = depth - decode_layer)
    en_out: depth_e/2 blocks, block i first mixes x = skip_linear(cat(x, skip_{-i}))
    masked pass only, the side-interpolater:
            scatter a learned mask token to the masked positions, + decoder_pos_embed,
            one block over all L tokens, then the masked shortcut
            x = mask * side(x) + (1 - mask) * x        (kept positions keep the encoder's)
    unmasked pass (and inference): x = x + decoder_pos_embed
    decoder: decode_layer blocks, each x = skip_linear(cat(x, tokens)) first (input skip)
    final adaLN layer, unpatchify.
Every attention adds a learned relative position bias (BEiT's table of (2g-1)^2 + 3 rows
per head, one table per block); in the masked pass it is gathered at the kept tokens.
Flash attention cannot add a bias, so attention runs on torch SDPA with an additive float
mask ('sdpa': CUDA picks its memory-efficient or math kernel) or explicitly ('math'); the
backend each layer ran on is in `last_backend`.

The encoder runs on the kept tokens only (`gather_tokens`); adaLN and the residual adds use
the same fused ops as the DiT blocks (`modulate_norm`, `residual_gate_norm`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import Backbone
from model.config import ModelConfig
from model.layers import (
    Branch,
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    add_gated,
    modulate_norm,
    residual_gate_norm,
    scatter_tokens,
    sincos_pos_embed_2d,
    unpatchify,
)


def relative_position_index(grid: int) -> torch.Tensor:
    """[g*g, g*g] index into a (2g-1)^2 (+3) table: BEiT's, as MDT builds it."""
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"))
    flat = coords.flatten(1)  # [2, L]
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0)  # [L, L, 2]
    rel[:, :, 0] += grid - 1
    rel[:, :, 1] += grid - 1
    rel[:, :, 0] *= 2 * grid - 1
    return rel.sum(-1)  # [L, L]


class RelPosAttention(nn.Module):
    """Self-attention with MDT's learned relative position bias (qkv with bias, projection)."""

    def __init__(self, dim: int, num_heads: int, grid: int, backend: str = "auto") -> None:
        super().__init__()
        if backend not in ("auto", "sdpa", "math"):
            raise ValueError(f"attention backend {backend!r} takes no additive bias; use 'sdpa', "
                             f"'math' or 'auto'")
        self.num_heads = num_heads
        self.backend = "sdpa" if backend == "auto" else backend
        self.last_backend: str | None = None
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # BEiT/MDT: (2g-1)^2 relative offsets + 3 rows for class tokens (unused, kept so
        # that the parameter count is the public code's).
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3,
                                                                     num_heads))

    def bias(self, index: torch.Tensor) -> torch.Tensor:
        """index [T, T] or [B, T, T] -> additive bias [H, T, T] or [B, H, T, T]."""
        b = self.relative_position_bias_table[index]  # [..., T, T, H]
        return b.movedim(-1, -3)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H = self.num_heads
        qkv = self.qkv(x).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # [3, B, H, T, Dh]
        q, k, v = qkv.unbind(0)
        bias = self.bias(index)  # [H, T, T] or [B, H, T, T]
        if self.backend == "math":
            scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(D // H)
            probs = (scores + bias.float()).softmax(dim=-1).to(v.dtype)
            out = probs @ v  # [B, H, T, Dh]
        else:
            bias = bias.to(q.dtype)
            if q.is_cuda and T % 8:
                # The memory-efficient kernel wants the bias rows 16-byte aligned: a padded
                # buffer viewed back to T columns, instead of torch's copy (and warning).
                bias = F.pad(bias, (0, -T % 8))[..., :T]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        self.last_backend = self.backend
        return self.proj(out.transpose(1, 2).reshape(B, T, D))  # [B, T, D]


class MDTBlock(nn.Module):
    """adaLN-Zero block with relative-position attention and, for MDT's out-blocks and
    decoder blocks, a skip: x = skip_linear(cat(x, skip)) before the block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, grid: int, attention: str,
                 skip: bool) -> None:
        super().__init__()
        self.attn = RelPosAttention(dim, num_heads, grid, attention)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: torch.Tensor, c: torch.Tensor, index: torch.Tensor, fused: bool,
                skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            # The residual stream keeps its dtype (fp32 under autocast) across the skip.
            x = self.skip_linear(torch.cat([x, skip.to(x.dtype)], dim=-1)).to(x.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=-1))  # 6 x [B, D]
        h = modulate_norm(x, shift_msa, scale_msa, fused)
        x, h = residual_gate_norm(x, self.attn(h, index), gate_msa, shift_mlp, scale_mlp, fused)
        return add_gated(x, self.mlp(h), gate_mlp)


class MDTBackbone(Backbone):
    """MDTv2's network F(x_in, c_noise, y) through the stages of `Backbone`: the encoder
    on the kept tokens, then (masked) the side-interpolater or (all tokens) the decoder
    positions, the decoder and the final layer."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        cfg = self.config = config
        D, grid = cfg.hidden_size, cfg.input_size // cfg.patch_size
        self.fused = cfg.use_kernels
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        sincos = sincos_pos_embed_2d(D, grid)[None]  # [1, L, D]
        if cfg.learned_pos_embed:
            self.pos_embed = nn.Parameter(sincos.clone())
            self.decoder_pos_embed = nn.Parameter(sincos.clone())
        else:
            self.register_buffer("pos_embed", sincos, persistent=False)
            self.register_buffer("decoder_pos_embed", sincos.clone(), persistent=False)
        self.register_buffer("rel_index", relative_position_index(grid), persistent=False)
        half = cfg.encoder_depth // 2

        def blocks(n: int, skip: bool) -> nn.ModuleList:
            return nn.ModuleList(MDTBlock(D, cfg.num_heads, cfg.mlp_ratio, grid, cfg.attention,
                                          skip) for _ in range(n))

        self.en_inblocks = blocks(half, skip=False)
        self.en_outblocks = blocks(half, skip=True)
        self.de_blocks = blocks(cfg.decoder_depth, skip=True)
        self.sideblocks = blocks(1, skip=False)
        self.mask_token = nn.Parameter(torch.zeros(D))
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.in_channels, D)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """MDTv2's: (linears already xavier) patch embedding like a linear, label table and
        timestep MLP N(0, 0.02), adaLN-Zero everywhere, zero output layer, mask token and
        bias tables N(0, 0.02) (tables truncated at +-2), positions from sin-cos."""
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.all_blocks():
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            nn.init.trunc_normal_(block.attn.relative_position_bias_table, std=0.02)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        grid = self.config.input_size // self.config.patch_size
        sincos = sincos_pos_embed_2d(self.config.hidden_size, grid)[None]
        self.pos_embed.copy_(sincos)
        self.decoder_pos_embed.copy_(sincos)

    def all_blocks(self) -> list[MDTBlock]:
        return [*self.en_inblocks, *self.en_outblocks, *self.sideblocks, *self.de_blocks]

    # ------------------------------------------------------------------------- stages
    def embed(self, x_in: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.x_embedder(x_in) + self.pos_embed  # [B, L, D]
        return tokens, self.t_embedder(c_noise) + self.y_embedder(y)  # c [B, D]

    def kept_index(self, ids_keep: torch.Tensor | None) -> torch.Tensor:
        """Relative-position index among the tokens attention sees: [L, L] or [B, K, K]."""
        if ids_keep is None:
            return self.rel_index
        return self.rel_index[ids_keep[:, :, None], ids_keep[:, None, :]]

    def encode(self, x: torch.Tensor, c: torch.Tensor, ids_keep: torch.Tensor | None = None
               ) -> torch.Tensor:
        """x: tokens [B, T, D] (the kept ones at ids_keep, or all) -> [B, T, D]."""
        index = self.kept_index(ids_keep)
        skips = []
        for block in self.en_inblocks:
            x = block(x, c, index, self.fused)
            skips.append(x)
        for block in self.en_outblocks:
            x = block(x, c, index, self.fused, skip=skips.pop())
        return x

    def side_interpolate(self, z: torch.Tensor, c: torch.Tensor, ids_keep: torch.Tensor
                         ) -> torch.Tensor:
        """Encoder output at the kept tokens [B, K, D] -> the full sequence [B, L, D]: mask
        tokens at the others, decoder positions, one block, the masked shortcut."""
        L = self.config.num_tokens
        x = scatter_tokens(z, ids_keep, self.mask_token, L, self.fused) + self.decoder_pos_embed
        x_before = x
        for block in self.sideblocks:
            x = block(x, c, self.rel_index, self.fused)
        kept = torch.zeros(z.shape[0], L, 1, device=z.device, dtype=x.dtype)
        kept.scatter_(1, ids_keep[:, :, None], 1.0)  # [B, L, 1]: 1 at kept tokens
        return x * (1 - kept) + kept * x_before

    def decode(self, z: torch.Tensor, c: torch.Tensor, ids_keep: torch.Tensor | None,
               tokens: torch.Tensor) -> tuple[Branch | None, torch.Tensor]:
        """z: encoder output [B, T, D] at ids_keep (all L when None); tokens: the input
        embedding [B, L, D], which every decoder block takes as its skip."""
        if ids_keep is None:  # the unmasked pass and inference: no side-interpolater
            x = z + self.decoder_pos_embed  # [B, L, D]
        else:
            x = self.side_interpolate(z, c, ids_keep)  # [B, L, D]
        for block in self.de_blocks:
            x = block(x, c, self.rel_index, self.fused, skip=tokens)
        return None, x  # MDT's blocks add their own residuals: nothing pending

    def final(self, branch: Branch | None, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        out = self.final_layer(branch, x, c, self.fused)  # [B, L, p*p*C]
        return unpatchify(out, cfg.patch_size, cfg.in_channels)  # [B, C, H, W]
