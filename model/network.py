"""The trained network: a backbone (model/backbone.py) and a method, the loss it trains
with (model/methods/), as the config's `backbone` and `method` name them.

    net.training_losses(x0, y, inputs)   # the method's loss over the backbone
    net.denoise(x, sigma, y)             # EDM's D(x; sigma), every token, for sampling
    net.update_teacher(m)                # SD-DiT's teacher EMA; nothing for the others

Weights are initialised in one place (`initialize_weights`), the method's own modules
included. State dict: `backbone.*` and `method.*` (SD-DiT's `method.head.*`,
`method.teacher.*`, `method.center`); a state dict from before the methods were loss
objects (`head.*`, `teacher.*`, `center` at the top) loads through `upgrade_state_dict`.
Inference runs every token through encoder and decoder; no teacher, no heads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from model.attention import Attention, resolve_backend
from model.config import ModelConfig
from model.dit import DiTBackbone
from model.mdt import MDTBackbone, RelPosAttention
from model.methods import LossInputs, method_class
from model.precond import denoised, edm_scalings, per_sample

CURRENT_PREFIXES = ("backbone.", "method.")


def upgrade_state_dict(state: dict[str, Any], prefix: str = "") -> list[str]:
    """Renames, in place, the keys of a state dict saved before the methods became loss
    objects: what sat at the network's top level beside `backbone.*` (SD-DiT's `head.*`,
    `teacher.*`, `center`) now sits under `method.`. Returns the renamed (old) keys."""
    old = [k for k in state if k.startswith(prefix)
           and not k[len(prefix):].startswith(CURRENT_PREFIXES)]
    for key in old:
        state[f"{prefix}method.{key[len(prefix):]}"] = state.pop(key)
    return old


def _upgrade_on_load(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    upgrade_state_dict(state, prefix)


class DiffusionTransformer(nn.Module):
    """The trained network. A teacher (SD-DiT) is a submodule of the method whose
    parameters have requires_grad=False: optimisers that take `p for p in parameters() if
    p.requires_grad` ignore it, and it is saved in the state dict with the student."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = MDTBackbone(config) if config.backbone == "mdt" else DiTBackbone(config)
        self.method = method_class(config.method)(config)
        self.initialize_weights()
        self.method.after_init(self.backbone)
        self.register_load_state_dict_pre_hook(_upgrade_on_load)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """All initialisation, DiT style: xavier linears, then the backbone's own (zero adaLN
        and output layers, ...), then the method's (SD-DiT's heads)."""
        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)
        self.backbone.initialize_weights()
        self.method.initialize_weights()

    # ------------------------------------------------------------------------- training
    def training_losses(self, x0: torch.Tensor, y: torch.Tensor,
                        inputs: LossInputs | None = None) -> dict[str, torch.Tensor]:
        """x0 [B, C, H, W], y [B] -> {"loss", "gen", and "dis" (SD-DiT) / "mae" (MaskDiT) /
        "gen_masked" (MDT)}: the method's loss. Noise, sigma, label dropout and masks come
        from the global RNG on x0's device; the step's mask ratio and teacher temperature
        from `inputs` (default: the config's)."""
        inputs = inputs if inputs is not None else LossInputs.defaults(self.config)
        return self.method(self.backbone, x0, y, inputs)

    @torch.no_grad()
    def update_teacher(self, momentum: float | torch.Tensor) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student (SD-DiT; else a no-op)."""
        self.method.update_teacher(self.backbone, momentum)

    def teacher_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(teacher tensor, student tensor) pairs that `update_teacher` averages."""
        return self.method.teacher_pairs(self.backbone)

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
