"""SD-DiT's discriminative branch (iBOT-style self-distillation; all choices assumed).

- `DiscriminativeHead`: LayerNorm, MLP D -> hidden -> hidden -> bottleneck (GELU), L2
  normalisation, then a weight-normalised linear to K prototypes (gain fixed at 1).
- `EMATeacher`: copies of the student's embedders, encoder blocks and head, updated only
  by `ema_update_`, never by gradients (its parameters have requires_grad=False).
- `self_distillation_loss`: cross-entropy between centred, sharpened teacher
  probabilities and student log-probabilities, per kept token.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.layers import gather_tokens, run_blocks, settle


class DiscriminativeHead(nn.Module):
    def __init__(self, dim: int, hidden: int, bottleneck: int, n_prototypes: int) -> None:
        super().__init__()
        # The encoder's residual stream has no final norm; normalise before projecting.
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden),
                                 nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.empty(n_prototypes, bottleneck))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, T, D] -> prototype logits [B, T, K] (cosine similarities)."""
        h = F.normalize(self.mlp(self.norm(z)), dim=-1)  # [B, T, bottleneck]
        return h @ F.normalize(self.prototypes, dim=-1).t()  # [B, T, K]


class EMATeacher(nn.Module):
    """The teacher encoder: embedders, encoder blocks and head, deep-copied from the student."""

    STUDENT_PARTS = ("x_embedder", "t_embedder", "y_embedder", "encoder")

    def __init__(self, backbone: nn.Module, head: DiscriminativeHead) -> None:
        super().__init__()
        for name in self.STUDENT_PARTS:
            setattr(self, name, copy.deepcopy(getattr(backbone, name)))
        self.head = copy.deepcopy(head)
        self.requires_grad_(False)

    def pairs(self, backbone: nn.Module, head: DiscriminativeHead
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(teacher tensors, matching student tensors), checked name by name."""
        teacher, student = [], []
        students = {name: getattr(backbone, name) for name in self.STUDENT_PARTS}
        students["head"] = head
        for part, student_module in students.items():
            t_params = dict(getattr(self, part).named_parameters())
            s_params = dict(student_module.named_parameters())
            if t_params.keys() != s_params.keys():
                raise RuntimeError(f"teacher and student {part} differ: {sorted(t_params)}")
            teacher += [t_params[k] for k in t_params]
            student += [s_params[k] for k in t_params]
        return teacher, student

    @torch.no_grad()
    def ema_update_(self, backbone: nn.Module, head: DiscriminativeHead,
                    momentum: float | torch.Tensor) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, for every tensor."""
        teacher, student = self.pairs(backbone, head)
        # lerp takes the weight as a float or a 0-dim tensor (the training step passes a
        # device tensor so that a skipped step needs no host read).
        torch._foreach_lerp_(teacher, [s.detach() for s in student], 1.0 - momentum)

    @torch.no_grad()
    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, y: torch.Tensor,
                pos_embed: torch.Tensor, ids_keep: torch.Tensor | None, fused: bool,
                all_tokens: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher view x_in [B, C, H, W] -> (logits [B, T, K] at the student's kept tokens,
        logits the centre averages: [B, L, K] at every token when all_tokens, else the
        same kept logits)."""
        tokens = self.x_embedder(x_in) + pos_embed  # [B, L, D]: every token
        c = self.t_embedder(c_noise) + self.y_embedder(y)  # [B, D]
        z = settle(*run_blocks(self.encoder, tokens, c, fused))  # [B, L, D]
        if ids_keep is None:
            logits = self.head(z)  # [B, L, K]
            return logits, logits
        if all_tokens:
            every = self.head(z)  # [B, L, K]
            return gather_tokens(every, ids_keep, fused), every
        kept = self.head(gather_tokens(z, ids_keep, fused))  # [B, T, K]
        return kept, kept


def self_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                           center: torch.Tensor, tau_s: float,
                           tau_t: float | torch.Tensor
                           ) -> torch.Tensor:
    """Mean over samples and tokens of -sum_k p_t log p_s; logits [B, T, K], center [K]."""
    targets = ((teacher_logits.float() - center) / tau_t).softmax(dim=-1)  # [B, T, K]
    log_probs = (student_logits.float() / tau_s).log_softmax(dim=-1)
    return -(targets * log_probs).sum(dim=-1).mean()


@torch.no_grad()
def update_center_(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float,
                   mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
    """center <- m center + (1 - m) batch mean of teacher logits; with data parallelism
    the batch mean is averaged over ranks by `mean_over_ranks`, which the training side
    supplies (model/ imports nothing distributed)."""
    batch_center = teacher_logits.float().flatten(0, -2).mean(dim=0)  # [K]
    if mean_over_ranks is not None:
        batch_center = mean_over_ranks(batch_center)
    center.mul_(momentum).add_(batch_center, alpha=1.0 - momentum)
