"""DiT building blocks: embedders, the adaLN-Zero block, the final layer, token ops.

Every op that has a fused kernel is called through one function here that picks, by
`fused`, the sdkernels op (Triton on CUDA / the interpreter) or that op's reference
(`sdkernels.<op>_ref`, plain torch that torch.compile sees through): the one reference
the kernel tests hold the kernels to. sdkernels is imported on first use, so that
`import model` does not import triton (TRITON_INTERPRET must be set before that).
Weights are initialised in one place, `DiffusionTransformer.initialize_weights`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from model.attention import Attention

LN_EPS = 1e-6


# ----------------------------------------------------------------------------- token ops
# Mixed precision: under bf16 autocast the residual stream x stays fp32 (the embedding adds
# the fp32 position table), while Linear outputs (the branch output y and the adaLN
# vectors) are bf16. The fused ops take exactly that layout, so neither side is cast: x
# stays fp32 in and out, and h comes back in bf16, ready for the next Linear.


def _compute_dtype(x: torch.Tensor, branch: torch.Tensor) -> torch.dtype:
    """The dtype the fused ops compute in: the branch's, unless x (the residual stream)
    is neither fp32 nor that dtype (a half-precision model fed fp32 vectors), then x's."""
    return branch.dtype if x.dtype in (torch.float32, branch.dtype) else x.dtype


def modulate_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, fused: bool
                  ) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift; x [B, T, D], shift/scale [B, D]. The result
    takes shift/scale's (compute) dtype."""
    import sdkernels

    dtype = _compute_dtype(x, shift)
    op = sdkernels.adaln_modulate if fused else sdkernels.adaln_modulate_ref
    return op(x, shift.to(dtype), scale.to(dtype), LN_EPS)


def residual_gate_norm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor,
                       shift: torch.Tensor, scale: torch.Tensor, fused: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + gate * y, its modulated norm) in one pass: the seam between two sub-blocks.
    The residual stream keeps x's dtype, the norm takes the compute dtype."""
    import sdkernels

    dtype = _compute_dtype(x, y)
    op = sdkernels.residual_gate_adaln if fused else sdkernels.residual_gate_adaln_ref
    return op(x, *(t.to(dtype) for t in (y, gate, shift, scale)), eps=LN_EPS)


def add_gated(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y where no norm follows (a stack's output), in x's dtype."""
    if x.dtype != torch.float32:  # keep a low-precision stream in its own dtype
        y, gate = y.to(x.dtype), gate.to(x.dtype)
    # No cast kernel of y: the product stays in y's dtype and the add promotes to x's
    # fp32 on the fly (addcmul would be cast by autocast, which "promotes" it).
    return x + gate[:, None].to(y.dtype) * y


def gather_tokens(x: torch.Tensor, ids_keep: torch.Tensor, fused: bool) -> torch.Tensor:
    """x [B, L, D], ids_keep [B, K] -> [B, K, D]."""
    import sdkernels

    if fused:
        return sdkernels.gather_tokens(x, ids_keep, check_ids=False)  # ids from argsort
    return sdkernels.gather_tokens_ref(x, ids_keep)


def scatter_tokens(x_keep: torch.Tensor, ids_keep: torch.Tensor, fill: torch.Tensor,
                   length: int, fused: bool) -> torch.Tensor:
    """x_keep [B, K, D] at ids_keep; every other position of the [B, L, D] output is `fill`
    ([B, L, D] noisy tokens, or a [D] mask token)."""
    import sdkernels

    fill = fill.to(x_keep.dtype)
    if fused:
        return sdkernels.scatter_tokens(x_keep, ids_keep, fill, length, check_ids=False)
    return sdkernels.scatter_tokens_ref(x_keep, ids_keep, fill, length)


def random_keep_ids(batch: int, length: int, num_kept: int, device: torch.device) -> torch.Tensor:
    """Per sample, the first num_kept of a random permutation (MAE style), sorted: [B, K]."""
    noise = torch.rand(batch, length, device=device)  # [B, L]
    ids_keep = noise.argsort(dim=1)[:, :num_kept]
    return ids_keep.sort(dim=1).values  # sorted: kept tokens stay in raster order


def kept_patch_weight(ids_keep: torch.Tensor, length: int) -> torch.Tensor:
    """[B, K] kept ids -> [B, L] with 1 at kept positions and 0 elsewhere."""
    weight = torch.zeros(ids_keep.shape[0], length, device=ids_keep.device)
    return weight.scatter(1, ids_keep, 1.0)


# ----------------------------------------------------------------------------- embedders
def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim]: half the channels encode x,
    half encode y, each as sin/cos at geometric frequencies."""
    def one_axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d // 2))
        angles = pos.flatten()[:, None] * omega[None]  # [grid*grid, d/2]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    return torch.cat([one_axis(xx, dim // 2), one_axis(yy, dim // 2)], dim=1).float()


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, L, D] with non-overlapping p x p patches in raster order."""

    def __init__(self, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, L, D]


class TimestepEmbedder(nn.Module):
    """Scalar noise level (EDM's c_noise) -> [B, D]: sinusoidal features, then an MLP."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) *
                          torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]  # [B, half]
        features = torch.cat([angles.cos(), angles.sin()], dim=-1)  # [B, freq_dim]
        return self.mlp(features.to(self.mlp[0].weight.dtype))  # [B, D]


class LabelEmbedder(nn.Module):
    """Class label -> [B, D]; index num_classes is the learned null class for CFG."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)  # [B, D]


def drop_labels(y: torch.Tensor, prob: float, null_class: int) -> torch.Tensor:
    """Replace labels by the null class with probability `prob` (classifier-free guidance)."""
    if prob <= 0:
        return y
    drop = torch.rand(y.shape, device=y.device) < prob  # [B]
    return torch.where(drop, torch.full_like(y, null_class), y)


# ----------------------------------------------------------------------------- blocks
class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Branch(NamedTuple):
    """A sub-block's output that is gated but not yet added to the residual stream. The
    layer after it adds it in the same pass as its own adaLN (`add_and_modulate`): the
    adaLN-Zero form of flash-attn's prenorm blocks, which return (hidden, residual) and let
    the next block do the fused add + norm with its own parameters."""

    y: torch.Tensor  # [B, T, D] the branch output (attention or MLP)
    gate: torch.Tensor  # [B, D] its adaLN-Zero gate


def add_and_modulate(branch: Branch | None, x: torch.Tensor, shift: torch.Tensor,
                     scale: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + gate * y, its modulated norm) in one fused pass; the norm of x alone when
    nothing is pending (the first layer of a stack)."""
    if branch is None:
        return x, modulate_norm(x, shift, scale, fused)
    return residual_gate_norm(x, branch.y, branch.gate, shift, scale, fused)


def settle(branch: Branch | None, x: torch.Tensor) -> torch.Tensor:
    """The residual stream with the pending branch added, where no norm follows."""
    return x if branch is None else add_gated(x, branch.y, branch.gate)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block, prenorm style: it takes the previous layer's pending
    branch and the residual stream, adds the one to the other fused with its own first
    adaLN, and returns its MLP branch still pending, so that every residual add runs fused
    with the adaLN after it while each block uses only its own modulation."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, cond_dim: int,
                 attention: str) -> None:
        super().__init__()
        self.attn = Attention(dim, num_heads, attention)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))

    def forward(self, branch: Branch | None, x: torch.Tensor, c: torch.Tensor, fused: bool
                ) -> tuple[Branch, torch.Tensor]:
        """branch: the previous layer's, or None; x [B, T, D]; c [B, Dc]."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.adaLN_modulation(c).chunk(6, dim=-1))  # 6 x [B, D]
        x, h = add_and_modulate(branch, x, shift_msa, scale_msa, fused)
        x, h = residual_gate_norm(x, self.attn(h), gate_msa, shift_mlp, scale_mlp, fused)
        return Branch(self.mlp(h), gate_mlp), x


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, c: torch.Tensor, fused: bool
               ) -> tuple[Branch | None, torch.Tensor]:
    """A stack on x [B, T, D] under conditioning c [B, Dc]: (its last branch, still
    pending, and the residual stream). `settle` them, or hand them to the next layer."""
    branch = None
    for block in blocks:
        branch, x = block(branch, x, c, fused)
    return branch, x


class FinalLayer(nn.Module):
    """adaLN (shift, scale) of the last hidden state (fused with the pending residual add),
    then a linear map to p*p*C per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, cond_dim: int) -> None:
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * dim))
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, branch: Branch | None, x: torch.Tensor, c: torch.Tensor, fused: bool
                ) -> torch.Tensor:
        """branch, x: the decoder's output [B, L, D] -> [B, L, p*p*C]."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)  # 2 x [B, D]
        _, h = add_and_modulate(branch, x, shift, scale, fused)
        return self.linear(h)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """[B, L, p*p*C] (per token: p rows of p columns of C) -> [B, C, H, W]."""
    B, L, _ = x.shape
    p, g = patch_size, int(math.isqrt(L))
    x = x.reshape(B, g, g, p, p, channels)  # [B, h, w, p, p, C]
    return x.permute(0, 5, 1, 3, 2, 4).reshape(B, channels, g * p, g * p)
