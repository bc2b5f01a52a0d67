"""What every method's loss shares: the per-step inputs it takes from the training side."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from model.config import ModelConfig


@dataclass(frozen=True)
class LossInputs:
    """What a loss takes each step from outside the model. The model holds no notion of
    progress: the training schedule (train/schedule.py) computes the first two from the
    step and the config, and the training side supplies the reduction over ranks, so that
    model/ imports nothing distributed. Without a schedule, `defaults(config)`."""

    mask_ratio: float  # share of the tokens the masked encoder pass drops this step
    # SD-DiT's teacher temperature tau_t (a device scalar when the step is a CUDA graph).
    teacher_temperature: float | torch.Tensor
    # Mean of a statistic over data-parallel ranks (SD-DiT's centre); None: one process.
    mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def defaults(cls, config: ModelConfig) -> LossInputs:
        """The config's own values: mask_ratio, and tau_t at the start of its warm-up."""
        return cls(mask_ratio=config.mask_ratio, teacher_temperature=config.tau_t_start)
