"""One training step, as the method runs it, with no host synchronisation.

    forward (loss module) -> backward -> global grad norm (clipped when asked)
    -> finiteness agreed by every rank -> optimizer -> SD-DiT teacher momentum
    -> sampling EMA

Why there is no `.item()` here: the GPU runs ahead of Python, and a read of a device value
in the middle of a step makes it idle while Python sets up the optimizer and EMA calls.
So the finite check stays on the device: the optimizer skips through its `found_inf`
tensor (torch's fused AdamW supports it on CPU and CUDA), the teacher and EMA updates
are scaled by the finite flag, and buffers a forward updates (SD-DiT's centre) are put
back. The step returns a device vector of its statistics that the loop reads only on
log steps. Optimizers without `found_inf` (apex FusedAdam) fall back to one host read.

Each phase is a `torch.profiler.record_function` range, so profiles (sddit profile) and
NVTX timelines name them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn
from torch.profiler import record_function

from train import distributed as D
from train.ema import SamplingEMA
from train.schedule import StepValues


@dataclass
class StepSettings:
    grad_clip: float  # max global grad norm; 0 disables clipping
    batch_size: int  # global


def global_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The pre-clip global gradient norm; grads are scaled down to max_norm when > 0."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                              max_norm)
    else:
        norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """torch's fused Adam/AdamW read `optimizer.found_inf` and skip on the device."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(
        optimizer.defaults.get("fused"))


class TrainStep:
    """Callable: (x, y, StepValues) -> device stats vector. The values (lr, teacher
    momentum, EMA decay, the loss's inputs) are the schedule's for this step
    (train/schedule.py); the loss gets its inputs with the reduction over ranks added.

    The vector is [loss, *parts (sorted names), grad_norm, finite], averaged over ranks,
    where finite is 1.0 when every rank's loss and gradients were finite (the step was
    applied) and 0.0 when it was skipped. `part_names` is set after the first call.
    """

    def __init__(self, net: nn.Module, loss_module: nn.Module,
                 optimizer: torch.optim.Optimizer, ema: SamplingEMA, info: D.DistInfo,
                 settings: StepSettings, autocast) -> None:
        self.net, self.loss_module, self.optimizer, self.ema = net, loss_module, optimizer, ema
        self.info, self.settings, self.autocast = info, settings, autocast
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.part_names: list[str] | None = None
        # FusedAdamWEMA does optimizer, teacher and EMA in one pass (train/fused_optim.py).
        self.fused = hasattr(optimizer, "teacher_in_bf16")
        self.device_skip = self.fused or supports_found_inf(optimizer)
        # Buffers a forward may update (SD-DiT's centre), restored when a step is skipped,
        # so a bad batch leaves no trace.
        self.buffers = [b for b in net.buffers() if b.is_floating_point()]
        self.snapshot = [b.detach().clone() for b in self.buffers]
        # The phases' ranges; a profiler may swap in one that also emits NVTX.
        self.phase_range: Callable[[str], AbstractContextManager] = record_function
        # SD-DiT's centre is a mean over the global batch: the loss averages it over ranks
        # with this (made once: a compiled loss guards on the function it is given).
        self.mean_over_ranks = partial(D.all_reduce_mean, info=info) if info.distributed else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, values: StepValues) -> torch.Tensor:
        with self.phase_range("phase:forward"):
            if self.buffers:
                torch._foreach_copy_(self.snapshot, self.buffers)
            shadows = self.optimizer.teacher_in_bf16() if self.fused else nullcontext()
            inputs = values.loss
            if self.mean_over_ranks is not None:
                inputs = replace(inputs, mean_over_ranks=self.mean_over_ranks)
            with self.autocast, shadows:
                losses = self.loss_module(x, y, inputs)
        with self.phase_range("phase:backward"):
            losses["loss"].backward()
        with self.phase_range("phase:grad_norm"):
            grad_norm = global_grad_norm(self.params, self.settings.grad_clip)
            stats = self._agreed_stats(losses, grad_norm)
            finite = stats[-1] > 0.5  # bool, on the device
        self._apply(values.lr, values.teacher_momentum, values.ema_beta, finite)
        return stats

    def _agreed_stats(self, losses: dict[str, torch.Tensor], grad_norm: torch.Tensor
                      ) -> torch.Tensor:
        if self.part_names is None:
            self.part_names = sorted(k for k in losses if k != "loss")
        device = losses["loss"].device
        local = torch.stack([losses["loss"].detach().float().reshape(())]
                            + [losses[k].detach().float().reshape(()) for k in self.part_names]
                            + [grad_norm.detach().float().to(device).reshape(())])
        finite = torch.isfinite(local).all().float().reshape(1)
        stats = D.all_reduce_mean(torch.cat([local.nan_to_num(0.0), finite]), self.info)
        # Any rank non-finite makes the mean < 1; then every rank skips alike.
        stats[-1] = (stats[-1] > 1.0 - 1e-6).float()
        # Keep the real non-finite values for the log (nan_to_num was for the reduction).
        return torch.where(stats[-1] > 0.5, stats, torch.cat([local, stats[-1:]]))

    def _apply(self, lr: float, teacher_momentum: float, ema_beta: float,
               finite: torch.Tensor) -> None:
        weight = finite.float()  # 1.0 applies this step's updates, 0.0 leaves all as they were
        if not self.device_skip and not bool(finite):  # apex: one host read, then skip
            self._skip()
            return
        if self.fused:
            self._apply_fused(lr, teacher_momentum, ema_beta, finite, weight)
            return
        with self.phase_range("phase:optimizer"):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.device_skip:
                self.optimizer.found_inf = 1.0 - weight
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._restore_buffers(finite)  # before the EMA, which copies the live buffers
        with self.phase_range("phase:teacher_ema"), torch.no_grad():
            # momentum 1 leaves the teacher unchanged: m_eff = 1 - (1 - m) * weight
            self.net.update_teacher(1.0 - (1.0 - teacher_momentum) * weight)
        with self.phase_range("phase:sampling_ema"):
            self.ema.update(self.net, 1.0 - (1.0 - ema_beta) * weight)

    def _apply_fused(self, lr: float, teacher_momentum: float, ema_beta: float,
                     finite: torch.Tensor, weight: torch.Tensor) -> None:
        with self.phase_range("phase:optimizer_teacher_ema"):
            self.optimizer.step(lr, teacher_momentum=teacher_momentum, ema_beta=ema_beta,
                                found_inf=1.0 - weight)
            self.optimizer.zero_grad(set_to_none=True)
        self._restore_buffers(finite)
        with self.phase_range("phase:sampling_ema"):
            self.ema.copy_buffers(self.net)

    def _restore_buffers(self, finite: torch.Tensor) -> None:
        if self.buffers:
            restored = [torch.where(finite, b, s) for b, s in zip(self.buffers, self.snapshot,
                                                                  strict=True)]
            torch._foreach_copy_(self.buffers, restored)

    def _skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.snapshot)
