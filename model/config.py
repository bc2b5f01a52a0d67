"""Model configuration: one frozen dataclass of every field, validated field by field.

`method` names the training method (its loss, model/methods/); the presets are in
model/presets.py. The backbone and the losses read these fields:
- backbone = 'dit' (one stack, optionally split into encoder and decoder) or 'mdt' (MDTv2:
  encoder halves joined by long skips, decoder blocks skipped from the input embedding, a
  side-interpolater);
- mask_ratio > 0 masks the student encoder's input (MDT: + U(0, mask_ratio_jitter) per
  step); the training schedule hands the losses the ratio of each step;
- learned_pos_embed / rel_pos_bias: MDT's trained positions and relative position bias;
- lambda_dis > 0 gives SD-DiT its EMA teacher and iBOT-style heads;
- decoder_depth / decoder_width / separate_decoder shape the decoder;
- decoder_fill says what sits at masked positions before the decoder;
- gen_loss_tokens and mae_weight (MaskDiT) shape the loss.
Choices marked (assumed) in METHOD.md are fields with the stated defaults; docs/method.md
says where each method's choices come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

BACKBONES = ("dit", "mdt")
ATTENTION_BACKENDS = ("auto", "flash_attn", "xformers", "sdpa", "math")


@dataclass(frozen=True)
class ModelConfig:
    method: str = "SD-DiT"
    # Data: ImageNet-256 latents through the SD VAE by default.
    input_size: int = 32
    in_channels: int = 4
    num_classes: int = 1000
    # Backbone.
    backbone: str = "dit"  # 'dit' | 'mdt' (see the module docstring)
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    learned_pos_embed: bool = False  # MDT: position embeddings trained, from 2-D sin-cos
    rel_pos_bias: bool = False  # MDT: a learned relative position bias per attention layer
    # Decoder. Not separate: the last decoder_depth of `depth` blocks, at hidden width.
    # Separate (MaskDiT): decoder_depth extra blocks of decoder_width after the encoder.
    decoder_depth: int = 4
    separate_decoder: bool = False
    decoder_width: int | None = None  # None: hidden_size
    decoder_num_heads: int | None = None  # None: num_heads
    decoder_fill: str = "noisy"  # masked positions: 'noisy' tokens or a learned 'mask_token'
    # Masking and losses.
    mask_ratio: float = 0.2  # (assumed) SD-DiT's reported optimum
    # MDT: the ratio of each step is mask_ratio + U(0, mask_ratio_jitter), drawn once per step.
    mask_ratio_jitter: float = 0.0
    class_dropout: float = 0.1
    gen_loss_tokens: str = "all"  # 'all' | 'kept'
    mae_weight: float = 0.0
    # EDM.
    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_min: float = 0.002  # (assumed) the teacher view's noise level
    # Discriminative branch (iBOT-style; all assumed).
    lambda_dis: float = 0.1
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    n_prototypes: int = 4096
    tau_s: float = 0.1
    tau_t_start: float = 0.04
    tau_t_end: float = 0.07
    tau_t_warmup_frac: float = 0.1
    center_momentum: float = 0.9
    # (assumed, iBOT) 'all': the centre averages the teacher's logits over every patch token
    # of its view; 'kept': over the student's kept tokens only.
    center_tokens: str = "all"
    # (assumed, iBOT) teacher EMA momentum, cosine from start (step 0) to end (last step).
    teacher_momentum_start: float = 0.996
    teacher_momentum_end: float = 1.0
    # (assumed) the teacher's noise level. 'min': input and conditioning at sigma_min (the
    # paper's reading); 'student': input at sigma_min, conditioning at the student's sigma;
    # 'logu:LO:HI': one sigma per sample, log-uniform in [LO, HI], for input and conditioning.
    teacher_sigma: str = "min"
    # Execution.
    use_kernels: bool = False
    attention: str = "auto"

    def __post_init__(self) -> None:
        validate(self)

    # Derived quantities, so that every consumer agrees on them.
    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def num_kept(self) -> int:
        """L_keep = L - round(r * L), the same count for every sample (MDT: int(L (1 - r)),
        as its public code, at the smallest ratio r = mask_ratio)."""
        if self.backbone == "mdt":
            return mdt_kept_tokens(self.num_tokens, self.mask_ratio)
        return kept_tokens(self.num_tokens, self.mask_ratio)

    @property
    def kept_distribution(self) -> list[tuple[int, float]]:
        """[(L_keep, probability)] of the masked encoder pass. One entry unless the ratio is
        drawn per step (mask_ratio_jitter > 0): then L_keep = int(L (1 - r)), r uniform."""
        if self.mask_ratio_jitter == 0:
            return [(self.num_kept if self.mask_ratio > 0 else self.num_tokens, 1.0)]
        L = self.num_tokens
        # u = L (1 - r) ~ U(lo, hi); rounded so that 1 - 0.3 - 0.2 lands on 0.5 exactly.
        lo = round(L * (1 - self.mask_ratio - self.mask_ratio_jitter), 9)
        hi = round(L * (1 - self.mask_ratio), 9)
        out = []
        for k in range(int(lo), int(hi) + 1):
            share = (min(hi, k + 1) - max(lo, k)) / (hi - lo)
            if share > 0:
                out.append((k, share))
        return out

    @property
    def encoder_tokens(self) -> int:
        """Tokens the (student) encoder sees per image in its masked training pass, rounded
        mean when the ratio is drawn per step (the chart's "patches")."""
        return int(round(sum(k * p for k, p in self.kept_distribution)))

    @property
    def encoder_passes(self) -> tuple[int, ...]:
        """Encoder tokens of each forward in one training step: MDT runs an unmasked pass
        (all L tokens) and a masked one."""
        if self.backbone == "mdt":
            return (self.num_tokens, self.encoder_tokens)
        return (self.encoder_tokens,)

    @property
    def encoder_depth(self) -> int:
        if self.separate_decoder:
            return self.depth
        return self.depth - self.decoder_depth

    @property
    def dec_width(self) -> int:
        if self.separate_decoder and self.decoder_width:
            return self.decoder_width
        return self.hidden_size

    @property
    def dec_heads(self) -> int:
        if self.separate_decoder and self.decoder_num_heads:
            return self.decoder_num_heads
        return self.num_heads

    @property
    def has_teacher(self) -> bool:
        return self.lambda_dis > 0

    @property
    def teacher_sigma_range(self) -> tuple[float, float] | None:
        """(LO, HI) of a sampled teacher sigma ('logu:LO:HI'); None for 'min' / 'student'."""
        return parse_teacher_sigma(self.teacher_sigma)


def kept_tokens(num_tokens: int, mask_ratio: float) -> int:
    """L_keep = L - round(r L): the tokens a masked encoder pass keeps, for every sample."""
    return num_tokens - int(round(mask_ratio * num_tokens))


def mdt_kept_tokens(num_tokens: int, mask_ratio: float) -> int:
    """MDT's count, int(L (1 - r)), as its public code rounds it."""
    return int(num_tokens * (1 - mask_ratio))


def parse_teacher_sigma(value: str) -> tuple[float, float] | None:
    """'min' | 'student' -> None; 'logu:LO:HI' -> (LO, HI). Anything else raises ValueError."""
    if value in ("min", "student"):
        return None
    parts = value.split(":") if isinstance(value, str) else []
    try:
        if len(parts) != 3 or parts[0] != "logu":
            raise ValueError
        lo, hi = float(parts[1]), float(parts[2])
    except ValueError:
        fail("teacher_sigma", f"must be 'min', 'student' or 'logu:LO:HI' (e.g. "
              f"'logu:0.002:0.05'), got {value!r}")
    if not 0 < lo <= hi:
        fail("teacher_sigma", f"needs 0 < LO <= HI, got {value!r}")
    return lo, hi


def fail(field: str, message: str) -> NoReturn:
    raise ValueError(f"model config: {field} {message}")


def validate(c: ModelConfig) -> None:
    """ValueError naming the first field that cannot hold, before anything is built."""
    _validate_shape_and_mask(c)
    if c.backbone == "mdt":
        validate_mdt(c)
    else:
        for name in ("learned_pos_embed", "rel_pos_bias", "mask_ratio_jitter"):
            if getattr(c, name):
                fail(name, "needs backbone='mdt' (the MDT layout)")
    _validate_decoder(c)
    _validate_training_fields(c)


def _validate_shape_and_mask(c: ModelConfig) -> None:
    if not isinstance(c.method, str) or not c.method:
        fail("method", f"must name a registered method (model.METHODS), got {c.method!r}")
    if c.backbone not in BACKBONES:
        fail("backbone", f"must be one of {BACKBONES}, got {c.backbone!r}")
    for name in ("input_size", "in_channels", "num_classes", "patch_size", "hidden_size",
                 "depth", "num_heads"):
        if not isinstance(getattr(c, name), int) or getattr(c, name) < 1:
            fail(name, f"must be a positive int, got {getattr(c, name)!r}")
    if c.input_size % c.patch_size != 0:
        fail("patch_size", f"{c.patch_size} must divide input_size {c.input_size}")
    if c.hidden_size % 4 != 0:
        fail("hidden_size", f"must be a multiple of 4 (2-D sin-cos position embedding), got "
              f"{c.hidden_size}")
    if c.hidden_size % c.num_heads != 0:
        fail("num_heads", f"{c.num_heads} must divide hidden_size {c.hidden_size}")
    if not 0.0 <= c.mask_ratio < 1.0:
        fail("mask_ratio", f"must be in [0, 1), got {c.mask_ratio}")
    if not 0.0 <= c.mask_ratio_jitter < 1.0 - c.mask_ratio:
        fail("mask_ratio_jitter", f"must be in [0, 1 - mask_ratio), got {c.mask_ratio_jitter}")
    if c.mask_ratio > 0 and min(k for k, _ in c.kept_distribution) < 1:
        fail("mask_ratio", f"{c.mask_ratio} (+ {c.mask_ratio_jitter}) keeps no token of "
              f"{c.num_tokens}")
    for name in ("learned_pos_embed", "rel_pos_bias"):
        if not isinstance(getattr(c, name), bool):
            fail(name, f"must be true or false, got {getattr(c, name)!r}")


def _validate_decoder(c: ModelConfig) -> None:
    if not c.separate_decoder and not 0 <= c.decoder_depth < c.depth:
        fail("decoder_depth", f"must be in [0, depth={c.depth}), got {c.decoder_depth}")
    if c.separate_decoder:
        if c.decoder_depth < 1:
            fail("decoder_depth", "must be >= 1 with separate_decoder")
        if c.dec_width % 4 != 0:
            fail("decoder_width", f"must be a multiple of 4, got {c.dec_width}")
        if c.dec_width % c.dec_heads != 0:
            fail("decoder_num_heads", f"{c.dec_heads} must divide decoder width {c.dec_width}")
    elif (c.decoder_width not in (None, c.hidden_size)
          or c.decoder_num_heads not in (None, c.num_heads)):
        fail("decoder_width", "and decoder_num_heads need separate_decoder=True to differ "
              "from hidden_size and num_heads")
    if c.decoder_fill not in ("noisy", "mask_token"):
        fail("decoder_fill", f"must be 'noisy' or 'mask_token', got {c.decoder_fill!r}")
    if c.gen_loss_tokens not in ("all", "kept"):
        fail("gen_loss_tokens", f"must be 'all' or 'kept', got {c.gen_loss_tokens!r}")


def _validate_training_fields(c: ModelConfig) -> None:
    """Attention, conditioning dropout, EDM constants, loss weights and the teacher."""
    if c.attention not in ATTENTION_BACKENDS:
        fail("attention", f"must be one of {ATTENTION_BACKENDS}, got {c.attention!r}")
    if not 0.0 <= c.class_dropout < 1.0:
        fail("class_dropout", f"must be in [0, 1), got {c.class_dropout}")
    for name in ("lambda_dis", "mae_weight"):
        if getattr(c, name) < 0:
            fail(name, f"must be >= 0, got {getattr(c, name)}")
    if c.sigma_data <= 0 or c.sigma_min <= 0 or c.P_std <= 0:
        fail("sigma_data/sigma_min/P_std", "must be > 0")
    if c.center_tokens not in ("all", "kept"):
        fail("center_tokens", f"must be 'all' or 'kept', got {c.center_tokens!r}")
    for name in ("teacher_momentum_start", "teacher_momentum_end"):
        if isinstance(getattr(c, name), bool) or not isinstance(getattr(c, name), (int, float)):
            fail(name, f"must be a number, got {getattr(c, name)!r}")
    if not 0.0 <= c.teacher_momentum_start <= c.teacher_momentum_end <= 1.0:
        fail("teacher_momentum_start", f"and teacher_momentum_end need 0 <= start <= end <= 1, "
              f"got {c.teacher_momentum_start} and {c.teacher_momentum_end}")
    parse_teacher_sigma(c.teacher_sigma)
    if c.has_teacher:
        if min(c.tau_s, c.tau_t_start, c.tau_t_end) <= 0:
            fail("tau_s/tau_t_start/tau_t_end", "must be > 0")
        if not 0.0 <= c.center_momentum <= 1.0:
            fail("center_momentum", f"must be in [0, 1], got {c.center_momentum}")
        if min(c.head_hidden_dim, c.head_bottleneck_dim, c.n_prototypes) < 1:
            fail("head dims", "must be positive")


def validate_mdt(c: ModelConfig) -> None:
    """MDT's layout: depth = 2 x half + decoder_depth, no teacher, no separate decoder."""
    if not 1 <= c.decoder_depth < c.depth or (c.depth - c.decoder_depth) % 2:
        fail("decoder_depth", f"with backbone='mdt' must leave an even encoder depth >= 2 "
              f"(two halves joined by long skips): depth {c.depth}, got {c.decoder_depth}")
    if c.mask_ratio <= 0:
        fail("mask_ratio", "must be > 0 with backbone='mdt' (its masked pass)")
    for name, value in (("lambda_dis", 0.0), ("mae_weight", 0.0), ("separate_decoder", False),
                        ("gen_loss_tokens", "all")):
        if getattr(c, name) != value:
            fail(name, f"must be {value!r} with backbone='mdt', got {getattr(c, name)!r}")
    if c.rel_pos_bias and c.attention not in ("auto", "sdpa", "math"):
        fail("attention", f"{c.attention!r} takes no additive bias: rel_pos_bias runs on "
              f"'sdpa' or 'math' ('auto' picks sdpa)")
