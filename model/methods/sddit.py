"""SD-DiT (Zhu et al. 2024) trained with EDM, following METHOD.md: DiT's masked pass with
the student's noisy tokens at the masked positions, plus a self-distillation loss between
the student encoder and an EMA teacher that sees every token of a near-clean view.

1. sigma = exp(P_mean + P_std N(0,1)), noise n; student view x0 + sigma n, teacher view
   x0 + sigma_min n (same n), both preconditioned in one pass; labels dropped to the null
   class with p = class_dropout.
2. The student encoder on a random keep set of L - round(r L) tokens -> z_s; the decoder
   on every token -> F; the EDM loss on every token ("gen").
3. The teacher (noise level per `teacher_sigma`), no grad, on all tokens of its view; the
   heads' cross-entropy at the kept tokens ("dis", weight lambda_dis), with a centre that
   averages the teacher's logits over all its tokens (or the kept, `center_tokens`) and
   a temperature tau_t that the schedule warms up.
The loss owns the teacher, the heads and the centre. With lambda_dis = 0 there are none,
and the loss is DiT's masked pass alone.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from model.backbone import Backbone
from model.config import ModelConfig
from model.heads import DiscriminativeHead, EMATeacher, self_distillation_loss, update_center_
from model.methods.base import LossInputs
from model.methods.dit import DiTLoss, MaskedPass, require_off
from model.precond import sample_log_uniform, teacher_view


class SDDiTLoss(DiTLoss):
    name = "SD-DiT"

    @classmethod
    def preset(cls, size: str, depth: int, hidden: int) -> dict[str, Any]:
        prototypes = {"XL": 8192, "tiny": 512}.get(size, 4096)
        return dict(mask_ratio=0.2, decoder_depth=depth // 6, lambda_dis=0.1, mae_weight=0.0,
                    decoder_fill="noisy", gen_loss_tokens="all", n_prototypes=prototypes)

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        require_off(config, cls.name, "mae_weight")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.head: DiscriminativeHead | None = None
        self.teacher: EMATeacher | None = None  # made in after_init, a copy of the student
        if config.has_teacher:
            self.head = DiscriminativeHead(config.hidden_size, config.head_hidden_dim,
                                           config.head_bottleneck_dim, config.n_prototypes)
            self.register_buffer("center", torch.zeros(config.n_prototypes))

    @torch.no_grad()
    def initialize_weights(self) -> None:
        if self.head is not None:
            for layer in self.head.mlp:
                if isinstance(layer, nn.Linear):
                    nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.normal_(self.head.prototypes, std=1.0)

    def after_init(self, backbone: Backbone) -> None:
        if self.head is not None:  # the teacher starts equal to the student
            self.teacher = EMATeacher(backbone, self.head)

    @torch.no_grad()
    def update_teacher(self, backbone: Backbone, momentum: float | torch.Tensor) -> None:
        if self.teacher is not None:
            self.teacher.ema_update_(backbone, self.head, momentum)

    def teacher_pairs(self, backbone: Backbone) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.teacher is None:
            return []
        return list(zip(*self.teacher.pairs(backbone, self.head), strict=True))

    def forward(self, backbone: Backbone, x0: torch.Tensor, y: torch.Tensor,
                inputs: LossInputs) -> dict[str, torch.Tensor]:
        cfg = self.config
        # The teacher view comes from the same pass when it sits at the fixed sigma_min.
        fixed_teacher = self.teacher is not None and cfg.teacher_sigma_range is None
        p = self.masked_pass(backbone, x0, y, inputs.mask_ratio,
                             cfg.sigma_min if fixed_teacher else None)
        losses = {"gen": self.denoising_loss(p.F, x0, p.sigma, p.noised,
                                             self.generative_weight(p))}
        total = losses["gen"]
        if self.teacher is not None:
            losses["dis"] = self.discriminative_loss(backbone, x0, p, inputs)
            total = total + cfg.lambda_dis * losses["dis"]
        losses["loss"] = total
        return losses

    def teacher_inputs(self, x0: torch.Tensor, p: MaskedPass
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's network input [B, C, H, W] and c_noise [B], per `teacher_sigma`:
        'min' sigma_min for both; 'student' the sigma_min view under the student's c_noise;
        'logu:LO:HI' a per-sample sigma_t ~ logU[LO, HI] for both (same noise draw)."""
        cfg, B, views = self.config, x0.shape[0], p.noised.views
        sampled = cfg.teacher_sigma_range
        if sampled is not None:
            sigma_t = sample_log_uniform(B, *sampled, x0.device)  # [B]
            return teacher_view(x0, p.noised.noise, sigma_t, cfg.sigma_data), sigma_t.log() / 4
        if cfg.teacher_sigma == "student":
            return views.x_in_teacher, views.c_noise
        c_noise = torch.full((B,), math.log(cfg.sigma_min) / 4, device=x0.device)  # [B]
        return views.x_in_teacher, c_noise

    def discriminative_loss(self, backbone: Backbone, x0: torch.Tensor, p: MaskedPass,
                            inputs: LossInputs) -> torch.Tensor:
        """Self-distillation between the student encoder's output z_s [B, L_keep, D] and
        the teacher, which sees every token of its view. The centre averages the teacher's
        logits over all its tokens or the kept ones (`center_tokens`); in training mode it
        moves, averaged over ranks by the training side's reduction."""
        cfg = self.config
        x_in_teacher, c_noise_teacher = self.teacher_inputs(x0, p)
        teacher_logits, center_logits = self.teacher(
            x_in_teacher, c_noise_teacher, p.noised.y, backbone.pos_embed, p.ids_keep,
            cfg.use_kernels, all_tokens=cfg.center_tokens == "all")  # [B, L_keep, K], no grad
        student_logits = self.head(p.z)  # [B, L_keep, K]
        with self.phase_range("losses"):
            loss = self_distillation_loss(student_logits, teacher_logits, self.center,
                                          cfg.tau_s, inputs.teacher_temperature)
            if self.training:
                update_center_(self.center, center_logits, cfg.center_momentum,
                               inputs.mean_over_ranks)
        return loss
