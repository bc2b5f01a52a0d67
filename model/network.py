"""The trained network: SD-DiT, DiT, MaskDiT and MDT, one class whose config says which
method it trains.

Training step (`training_losses`), following METHOD.md:
1. sigma = exp(P_mean + P_std N(0,1)), noise n; student view x0 + sigma n, teacher view
   x0 + sigma_min n (same n); EDM preconditioning of both.
2. Tokens and conditioning; labels dropped to the null class with p = class_dropout.
3. Per-sample random keep set of L_keep tokens (mask_ratio > 0).
4. Student encoder on the kept tokens -> z_s [B, L_keep, D].
5. (SD-DiT) Teacher on all tokens of the teacher view (noise level per `teacher_sigma`),
   no grad; self-distillation loss between the heads' outputs at the kept tokens; the
   centre averages the teacher's logits over all its tokens (or the kept, `center_tokens`).
6. Decoder on the full sequence (z_s at kept positions; noisy tokens or a mask token at the
   others) -> F; EDM loss on all tokens, or the kept ones (MaskDiT), plus MaskDiT's MAE term.
Inference (`denoise`) runs every token through encoder and decoder; no teacher, no heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from model.attention import Attention, resolve_backend
from model.config import ModelConfig, kept_tokens
from model.dit import DiTBackbone
from model.heads import (
    DiscriminativeHead,
    EMATeacher,
    self_distillation_loss,
    update_center_,
)
from model.layers import drop_labels, gather_tokens, kept_patch_weight, random_keep_ids
from model.mdt import MDTBackbone, RelPosAttention, sample_num_kept
from model.methods import LossInputs
from model.precond import (
    NoisyViews,
    denoised,
    edm_loss,
    edm_scalings,
    mae_loss,
    per_sample,
    precondition,
    sample_log_uniform,
    sample_sigma,
    teacher_view,
)


def _unmarked(phase: str) -> AbstractContextManager:
    return nullcontext()


class DiffusionTransformer(nn.Module):
    """The trained network. The teacher (SD-DiT only) is a submodule whose parameters have
    requires_grad=False: optimisers that take `p for p in parameters() if p.requires_grad`
    ignore it, and it is saved in the state dict with the student."""

    # The loss's functional parts (noise, mask, losses) run inside `phase_range(name)`. A
    # profiler sets it on one instance (`sddit profile`: record_function and NVTX ranges);
    # the default marks nothing and costs nothing. Module parts take forward hooks instead.
    phase_range: Callable[[str], AbstractContextManager] = staticmethod(_unmarked)

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = MDTBackbone(config) if config.backbone == "mdt" else DiTBackbone(config)
        self.head: DiscriminativeHead | None = None
        self.teacher: EMATeacher | None = None
        if config.has_teacher:
            self.head = DiscriminativeHead(config.hidden_size, config.head_hidden_dim,
                                           config.head_bottleneck_dim, config.n_prototypes)
            self.register_buffer("center", torch.zeros(config.n_prototypes))
        self.initialize_weights()
        if config.has_teacher:
            self.teacher = EMATeacher(self.backbone, self.head)  # starts equal to the student

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """All initialisation, DiT style: xavier linears, then the backbone's own (zero adaLN
        and output layers, ...), then the heads."""
        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        self.backbone.initialize_weights()
        if self.head is not None:
            for layer in self.head.mlp:
                if isinstance(layer, nn.Linear):
                    nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.normal_(self.head.prototypes, std=1.0)

    # ------------------------------------------------------------------------- training
    def training_losses(self, x0: torch.Tensor, y: torch.Tensor,
                        inputs: LossInputs | None = None) -> dict[str, torch.Tensor]:
        """x0 [B, C, H, W], y [B] -> {"loss", "gen", and "dis" (SD-DiT) / "mae" (MaskDiT)}.
        Noise, sigma, label dropout and masks come from the global RNG on x0's device; the
        step's mask ratio and teacher temperature from `inputs` (default: the config's)."""
        cfg, bb, fused = self.config, self.backbone, self.config.use_kernels
        inputs = inputs if inputs is not None else LossInputs.defaults(cfg)
        if cfg.backbone == "mdt":
            return self.mdt_losses(x0, y, inputs)
        B, L, device = x0.shape[0], cfg.num_tokens, x0.device
        sigma = sample_sigma(B, cfg.P_mean, cfg.P_std, device)  # [B]
        noise = torch.randn_like(x0)  # [B, C, H, W]
        y = drop_labels(y, cfg.class_dropout, cfg.num_classes)  # [B]
        # The teacher view comes from the same pass when it sits at the fixed sigma_min.
        fixed_teacher = cfg.has_teacher and cfg.teacher_sigma_range is None
        with self.phase_range("noise"):
            views = precondition(x0, noise, sigma, cfg.sigma_min if fixed_teacher else None,
                                 cfg.sigma_data, fused)
        with self.phase_range("mask"):
            ids_keep = None
            if inputs.mask_ratio > 0:
                ids_keep = random_keep_ids(B, L, kept_tokens(L, inputs.mask_ratio), device)

        tokens, c = bb.embed(views.x_in, views.c_noise, y)  # [B, L, D], [B, D]
        with self.phase_range("mask"):
            kept = gather_tokens(tokens, ids_keep, fused) if ids_keep is not None else tokens
        z = bb.encode(kept, c, ids_keep)  # [B, L_keep, D]
        F = bb.final(*bb.decode(z, c, ids_keep, tokens), c)  # [B, C, H, W]

        kept_weight = kept_patch_weight(ids_keep, L) if ids_keep is not None else None  # [B, L]
        gen_weight = kept_weight if cfg.gen_loss_tokens == "kept" else None
        with self.phase_range("losses"):
            gen = edm_loss(F, views.x_noisy, x0, sigma, cfg.sigma_data, gen_weight,
                           cfg.patch_size, fused).mean()
        losses = {"gen": gen}
        total = gen
        if cfg.has_teacher:
            x_in_t, c_noise_t = self.teacher_inputs(x0, noise, views)
            losses["dis"] = self.discriminative_loss(z, x_in_t, c_noise_t, y, ids_keep, inputs)
            total = total + cfg.lambda_dis * losses["dis"]
        if cfg.mae_weight > 0 and kept_weight is not None:
            with self.phase_range("losses"):
                losses["mae"] = mae_loss(F, views.x_noisy, sigma, cfg.sigma_data,
                                         1 - kept_weight, cfg.patch_size).mean()
            total = total + cfg.mae_weight * losses["mae"]
        losses["loss"] = total
        return losses

    def mdt_losses(self, x0: torch.Tensor, y: torch.Tensor, inputs: LossInputs
                   ) -> dict[str, torch.Tensor]:
        """MDTv2's step under EDM: one sigma per sample shared by two forwards, each with its
        own noise and label dropout (as the public code's two `training_losses` calls share
        t): "gen" of the unmasked pass plus "gen_masked" of the masked pass, whose ratio
        r = inputs.mask_ratio + U(0, mask_ratio_jitter) is drawn once per step (CPU generator, no
        device sync) and keeps int(L (1 - r)) tokens per sample."""
        cfg, bb, fused = self.config, self.backbone, self.config.use_kernels
        B, L, device = x0.shape[0], cfg.num_tokens, x0.device
        sigma = sample_sigma(B, cfg.P_mean, cfg.P_std, device)  # [B]
        losses = {}
        for name in ("gen", "gen_masked"):
            noise = torch.randn_like(x0)
            labels = drop_labels(y, cfg.class_dropout, cfg.num_classes)  # [B]
            with self.phase_range("noise"):
                views = precondition(x0, noise, sigma, None, cfg.sigma_data, fused)
            tokens, c = bb.embed(views.x_in, views.c_noise, labels)  # [B, L, D], [B, D]
            ids_keep, kept = None, tokens
            if name == "gen_masked":
                with self.phase_range("mask"):
                    num_kept = sample_num_kept(L, inputs.mask_ratio, cfg.mask_ratio_jitter)
                    ids_keep = random_keep_ids(B, L, num_kept, device)  # [B, K]
                    kept = gather_tokens(tokens, ids_keep, fused)  # [B, K, D]
            z = bb.encode(kept, c, ids_keep)  # [B, K, D]
            F = bb.final(*bb.decode(z, c, ids_keep, tokens), c)  # [B, C, H, W]
            with self.phase_range("losses"):
                losses[name] = edm_loss(F, views.x_noisy, x0, sigma, cfg.sigma_data, None,
                                        cfg.patch_size, fused).mean()
        losses["loss"] = losses["gen"] + losses["gen_masked"]
        return losses

    def teacher_inputs(self, x0: torch.Tensor, noise: torch.Tensor, views: NoisyViews
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's network input [B, C, H, W] and c_noise [B], per `teacher_sigma`:
        'min' sigma_min for both; 'student' the sigma_min view under the student's c_noise;
        'logu:LO:HI' a per-sample sigma_t ~ logU[LO, HI] for both (same noise draw)."""
        cfg, B = self.config, x0.shape[0]
        sampled = cfg.teacher_sigma_range
        if sampled is not None:
            sigma_t = sample_log_uniform(B, *sampled, x0.device)  # [B]
            return teacher_view(x0, noise, sigma_t, cfg.sigma_data), sigma_t.log() / 4
        if cfg.teacher_sigma == "student":
            return views.x_in_teacher, views.c_noise
        c_noise = torch.full((B,), math.log(cfg.sigma_min) / 4, device=x0.device)  # [B]
        return views.x_in_teacher, c_noise

    def discriminative_loss(self, z_s: torch.Tensor, x_in_teacher: torch.Tensor,
                            c_noise_teacher: torch.Tensor, y: torch.Tensor,
                            ids_keep: torch.Tensor | None, inputs: LossInputs) -> torch.Tensor:
        """z_s: student encoder output [B, L_keep, D]; the teacher sees every token of its
        view. The centre averages the teacher's logits over all its tokens or the kept ones
        (`center_tokens`)."""
        cfg = self.config
        teacher_logits, center_logits = self.teacher(
            x_in_teacher, c_noise_teacher, y, self.backbone.pos_embed, ids_keep,
            cfg.use_kernels, all_tokens=cfg.center_tokens == "all")  # [B, L_keep, K], no grad
        student_logits = self.head(z_s)  # [B, L_keep, K]
        with self.phase_range("losses"):
            loss = self_distillation_loss(student_logits, teacher_logits, self.center,
                                          cfg.tau_s, inputs.teacher_temperature)
            if self.training:
                update_center_(self.center, center_logits, cfg.center_momentum,
                               inputs.mean_over_ranks)
        return loss

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student (SD-DiT; else a no-op)."""
        if self.teacher is not None:
            self.teacher.ema_update_(self.backbone, self.head, momentum)

    # ------------------------------------------------------------------------- inference
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor | float, y: torch.Tensor,
                cfg_scale: float = 1.0) -> torch.Tensor:
        """EDM's D(x; sigma) on all tokens; CFG over all channels with the null class.
        x [B, C, H, W] in any float dtype (computed in fp32, returned in x's dtype)."""
        out_dtype, x = x.dtype, x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        sigma = sigma.expand(x.shape[0])  # [B]
        if cfg_scale == 1.0:
            return self._denoise(x, sigma, y).to(out_dtype)
        null = torch.full_like(y, self.config.num_classes)
        both = self._denoise(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([y, null]))
        cond, uncond = both.chunk(2)  # [B, C, H, W] each
        return (uncond + cfg_scale * (cond - uncond)).to(out_dtype)

    def _denoise(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s = edm_scalings(sigma, self.config.sigma_data)
        F = self.backbone(per_sample(s.c_in, x) * x, s.c_noise, y)  # [B, C, H, W]
        return denoised(x, F, sigma, self.config.sigma_data)

    # ------------------------------------------------------------------------- reporting
    @property
    def attention_backend(self) -> str:
        """The backend the latest forward ran on; before any, the one fp32 tensors on this
        net's device would get (autocast to fp16/bf16 on CUDA may then pick a faster one)."""
        for module in self.backbone.modules():
            if isinstance(module, (Attention, RelPosAttention)) and module.last_backend:
                return module.last_backend
        cfg = self.config
        if cfg.backbone == "mdt":  # an additive bias: SDPA unless 'math' is forced
            return "math" if cfg.attention == "math" else "sdpa"
        if cfg.attention != "auto":
            return cfg.attention
        weight = self.backbone.final_layer.linear.weight
        probe = torch.empty(1, 1, cfg.num_heads, cfg.hidden_size // cfg.num_heads,
                            device=weight.device, dtype=weight.dtype)
        return resolve_backend("auto", probe)
