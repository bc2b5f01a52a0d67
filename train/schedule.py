"""Everything a training step takes that moves with the step, from one object.

    schedule = Schedule.from_config(cfg)          # built once, from the run's config
    values = schedule.at(step, planned_steps)     # the loop asks once per step ...
    step_fn(x, y, values)                         # ... and passes the values down

`StepValues` holds, for optimizer step `step` (0-based) of a run planned for
`planned_steps`:
- lr: linear warm-up over optim.warmup_steps, then optim.lr;
- ema_beta: the sampling EMA's decay (EDM's half-life form, ema.*; train/ema.py);
- teacher_momentum: SD-DiT's teacher EMA, cosine from teacher_momentum_start (step 0) to
  teacher_momentum_end (the planned last step), iBOT/DINO style; 1 without a teacher;
- loss: the loss's inputs (`model.LossInputs`): the teacher temperature, a linear warm-up
  from tau_t_start to tau_t_end over the first tau_t_warmup_frac of the plan, and the mask
  ratio: the model's, except over the last schedule.unmasked_finetune_steps of
  schedule.total_steps, where it is 0 (MaskDiT's second stage: every token through the
  encoder, no mask tokens, the loss over all tokens and no MAE term, as its public
  configs/finetune run). The switch step counts from the configured total, not a time
  budget's planned length, so it never moves.

The model-side fields (teacher momentum, temperature, mask ratio) are the model config's;
the model itself holds no notion of progress. Everything is a pure function of the step,
the planned length and the config (images seen = step x batch size), so a resumed run gets
the values the uninterrupted one would. The planned length is the run's total_steps, or
for a run bounded by schedule.max_minutes what the measured rate fits (train/loop.py's
PlannedLength).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import model
from train.config import Config, EMAConfig, OptimConfig


@dataclass(frozen=True)
class StepValues:
    lr: float
    ema_beta: float
    teacher_momentum: float
    loss: model.LossInputs


def learning_rate(cfg: OptimConfig, step: int) -> float:
    """lr for optimizer step `step` (0-based): linear warmup over warmup_steps."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


def ema_beta(cfg: EMAConfig, images_seen: int, batch_size: int) -> float:
    """The sampling EMA's decay for one step of `batch_size` images after `images_seen`:
    beta = 0.5 ** (B / half_life_images), half_life_images = min(half_life, ramp * seen),
    or the fixed ema.decay."""
    if cfg.decay > 0:
        return cfg.decay
    half_life = cfg.half_life_kimg * 1000.0
    if cfg.rampup_ratio > 0:
        half_life = min(half_life, images_seen * cfg.rampup_ratio)
    if half_life <= 0:
        return 0.0
    return 0.5 ** (batch_size / half_life)


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine from start (step 0) to end (step total_steps and after)."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


def linear_warmup(step: int, total_steps: int, start: float, end: float,
                  warmup_frac: float) -> float:
    """Linear from start to end over the first warmup_frac of total_steps, then end."""
    warmup = warmup_frac * total_steps
    if warmup <= 0:
        return end
    return start + (end - start) * min(1.0, max(0.0, step / warmup))


@dataclass(frozen=True)
class Schedule:
    optim: OptimConfig
    ema: EMAConfig
    batch_size: int  # global
    model_config: model.ModelConfig
    total_steps: int = 0  # the configured run length (schedule.total_steps)
    unmasked_finetune_steps: int = 0  # the last N of total_steps train unmasked

    @classmethod
    def from_config(cls, cfg: Config) -> Schedule:
        """The run's schedule; the model-side fields come from the model config that
        cfg.model names (its preset and overrides)."""
        return cls(cfg.optim, cfg.ema, cfg.schedule.batch_size,
                   model.make_config(cfg.model.name, **cfg.model.overrides),
                   cfg.schedule.total_steps, cfg.schedule.unmasked_finetune_steps)

    @property
    def finetune_start(self) -> int | None:
        """The first unmasked step, or None without a fine-tune stage."""
        if self.unmasked_finetune_steps <= 0:
            return None
        return self.total_steps - self.unmasked_finetune_steps

    def mask_ratio(self, step: int) -> float:
        start = self.finetune_start
        return 0.0 if start is not None and step >= start else self.model_config.mask_ratio

    def at(self, step: int, planned_steps: int) -> StepValues:
        return StepValues(lr=learning_rate(self.optim, step),
                          ema_beta=ema_beta(self.ema, step * self.batch_size, self.batch_size),
                          teacher_momentum=self.teacher_momentum(step, planned_steps),
                          loss=self.loss_inputs(step, planned_steps))

    def teacher_momentum(self, step: int, planned_steps: int) -> float:
        m = self.model_config
        if not m.has_teacher:
            return 1.0
        return cosine(step, planned_steps, m.teacher_momentum_start, m.teacher_momentum_end)

    def loss_inputs(self, step: int, planned_steps: int) -> model.LossInputs:
        m = self.model_config
        return model.LossInputs(
            mask_ratio=self.mask_ratio(step),
            teacher_temperature=linear_warmup(step, planned_steps, m.tau_t_start, m.tau_t_end,
                                              m.tau_t_warmup_frac))
