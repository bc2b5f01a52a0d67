"""`run.cuda_graphs`: the whole training step captured once as a CUDA graph and replayed.

A step launches a few thousand kernels, each with Python dispatch in front of it; with
masks of a fixed size per preset the step is shape-static, so it can be captured once and
replayed with one launch. What is captured is TrainStep's own body (train/step.py), not a
copy of it, driven through static buffers:
- the batch is copied into fixed input tensors before each replay;
- the step's scalars (lr, teacher momentum, EMA beta, teacher temperature) live in device
  tensors filled before each replay, so the schedule keeps moving while the graph stays
  the same (a mask ratio that changes would change shapes: that is refused);
- noise and masks are drawn inside the graph from the CUDA generator (graph-safe: each
  replay advances its offset);
- the statistics vector is cloned after each replay, since the next one overwrites it.

Where it holds: one CUDA device (no DDP/FSDP collectives in the graph), torch's fused AdamW
with a tensor lr (the one-pass FusedAdamWEMA bakes its scalars into the launch, so it is
not used here), no torch.compile, and a fixed number of kept tokens (MDT draws its mask
ratio per step on the host, which changes shapes). `check_cuda_graphs` refuses the rest
before any work. Autocast runs with its weight-cast cache off, as capture requires.

On a CPU (tests) `capture=False` runs the same body through the same static buffers
eagerly, so the plumbing is checked against the plain step where no GPU exists.
"""

from __future__ import annotations

import torch

from model import LossInputs
from train.config import Config, ConfigError, compile_mode
from train.schedule import StepValues
from train.step import TrainStep

WARMUP_STEPS = 3  # eager steps (real ones) on a side stream before capture


def check_cuda_graphs(cfg: Config, device: torch.device, world_size: int) -> None:
    """ConfigError before any work when run.cuda_graphs cannot hold."""
    if not cfg.run.cuda_graphs:
        return
    problems = []
    if device.type != "cuda":
        problems.append("it needs a CUDA device")
    if world_size > 1:
        problems.append("it runs on one GPU (no collectives are captured)")
    if compile_mode(cfg.run.compile) == "on":
        problems.append("run.compile must be off")
    if cfg.run.fused_optimizer == "on":
        problems.append("run.fused_optimizer must be 'auto' or 'off' (its scalars are "
                        "baked into each launch)")
    if float(cfg.model.overrides.get("mask_ratio_jitter", 0.0)) > 0:
        problems.append("the mask ratio must not change per step (mask_ratio_jitter > 0)")
    if problems:
        raise ConfigError("run.cuda_graphs: " + "; ".join(problems))


class GraphedStep:
    """Same call as TrainStep: (x, y, StepValues) -> device stats.

    The first WARMUP_STEPS calls are ordinary eager steps (on a side stream, with their own
    batches), so that lazy allocations and autotuning happen before capture; the next call
    captures the body and every call from then on replays it."""

    def __init__(self, step: TrainStep, capture: bool = True) -> None:
        if step.fused:
            raise ConfigError("run.cuda_graphs needs torch's fused AdamW (set "
                              "run.fused_optimizer='off')")
        if getattr(step.net.config, "mask_ratio_jitter", 0.0) > 0:
            raise ConfigError("run.cuda_graphs: this model changes its kept-token count per "
                              "step (mask_ratio_jitter > 0), so its step cannot be captured")
        self.step, self.capture = step, capture
        device = step.params[0].device
        # lr, teacher momentum, EMA beta, teacher temperature
        self.scalars = torch.zeros(4, dtype=torch.float32, device=device)
        self.mask_ratio: float | None = None  # the captured graph's
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.stats: torch.Tensor | None = None
        self.graph = None
        self.calls = 0

    @property
    def part_names(self) -> list[str] | None:
        return self.step.part_names

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return self.step.params

    def _body(self) -> torch.Tensor:
        lr, momentum, beta, temperature = self.scalars.unbind()
        inputs = LossInputs(mask_ratio=self.mask_ratio, teacher_temperature=temperature)
        return self.step(self.x, self.y, StepValues(lr, beta, momentum, inputs))

    def __call__(self, x: torch.Tensor, y: torch.Tensor, values: StepValues) -> torch.Tensor:
        if self.x is None:
            self.x, self.y = torch.empty_like(x), torch.empty_like(y)
            self.mask_ratio = values.loss.mask_ratio
        if values.loss.mask_ratio != self.mask_ratio:
            raise ConfigError(f"run.cuda_graphs: the mask ratio moved from {self.mask_ratio} to "
                              f"{values.loss.mask_ratio}, which changes the captured shapes")
        self.x.copy_(x)
        self.y.copy_(y)
        # fill_ takes the value as a launch argument: no host sync, no host buffer to race.
        scalars = (values.lr, values.teacher_momentum, values.ema_beta,
                   values.loss.teacher_temperature)
        for i, value in enumerate(scalars):
            self.scalars[i].fill_(value)
        self.calls += 1
        if not self.capture:
            return self._body().clone()
        if self.calls <= WARMUP_STEPS:
            return self._on_side_stream()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.stats.clone()

    def _on_side_stream(self) -> torch.Tensor:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            stats = self._body().clone()
        torch.cuda.current_stream().wait_stream(side)
        return stats

    def _capture(self) -> None:
        self.step.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.stats = self._body()
