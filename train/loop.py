"""The training loop, in the phases a reader follows like the method:

    set up (device, data, model, optimizer) -> resume -> steps -> shut down

A step (train/step.py) is forward, backward, grad norm, the finite check agreed by every
rank, optimizer, SD-DiT teacher momentum, sampling EMA; it leaves its statistics on the
device. The loop reads them only on log steps (and before a checkpoint), so the GPU is never
idled mid-step. A non-finite loss or gradient skips that step's updates on the device (the
batch is consumed) and is logged; `optim.max_consecutive_nonfinite` in a row stop the run at
the next log step.

What changes with the step (lr, sampling EMA decay, teacher momentum and temperature, mask
ratio) comes from one object, train/schedule.py's Schedule: the loop asks it once per step
and hands the values to the step, which hands the loss its part. The schedule follows the
run's planned length: `schedule.total_steps`, or for a run bounded by
`schedule.max_minutes`, the steps that the measured rate fits into the budget.

Resume is exact: the checkpoint carries the step, every rank's RNG states and the data
position (epoch, batches consumed); the data source starts at that position and the RNG
states are restored, so the continued run draws what the uninterrupted one would. Which
checkpoint, and what happens to the others, is train/resume.py's business.

SIGTERM or Ctrl-C: the current step finishes (every rank agrees on where to stop), a
checkpoint is saved, and TrainingInterrupted is raised (the CLI exits 128 + signal).
"""

from __future__ import annotations

import inspect
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from train import checkpoint as ckpt
from train import distributed as D
from train.config import Config, ConfigError, save_resolved, to_dict
from train.ema import SamplingEMA
from train.execution import (
    ExecutionPlan,
    PrecisionChoice,
    accelerated_denoiser,
    inductor_options,
    plan_execution,
)
from train.graphs import GraphedStep, check_cuda_graphs
from train.logging_utils import GpuTelemetry, MetricsLogger, plot_loss_curve, read_jsonl
from train.optim import build_fused_optimizer, build_optimizer, wants_fused_optimizer
from train.resume import config_changes, plan_resume
from train.schedule import Schedule
from train.signals import StopSignals
from train.step import StepSettings, TrainStep

# A wall-clock budget shorter than this leaves a CPU compilation no time to pay off.
COMPILE_MIN_MINUTES = 4.0


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or Ctrl-C: the run saved a checkpoint and stopped."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        super().__init__(f"stopped by signal {signum}; checkpoint: {checkpoint or '(none)'}")
        self.signum, self.checkpoint = signum, checkpoint


@dataclass
class TrainResult:
    step: int
    run_dir: str
    checkpoint: str | None
    metrics: str
    sample_grid: str | None = None
    loss_curve: str | None = None
    final_loss: float | None = None
    stopped_by: str = "total_steps"
    skipped_steps: int = 0
    notes: list[str] = field(default_factory=list)


class DataStream:
    """Endless batches over epochs, tracking (epoch, batches consumed) for checkpoints."""

    def __init__(self, batches, epoch: int = 0, position: int = 0) -> None:
        self.batches, self.epoch, self.position = batches, epoch, position
        self._iter: Iterator | None = None
        self._start_epoch(position)

    def _start_epoch(self, start: int = 0) -> None:
        takes_start = "start_step" in inspect.signature(self.batches.set_epoch).parameters
        if takes_start:  # resume by position: nothing is decoded to get there
            self.batches.set_epoch(self.epoch, start_step=start)
        else:
            self.batches.set_epoch(self.epoch)
        self._iter = iter(self.batches)
        self.position = start
        if not takes_start:  # a source without positions: read up to where we were
            for _ in range(start):
                next(self._iter)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            batch = next(self._iter)
        except StopIteration:
            self.epoch += 1
            self._start_epoch()
            batch = next(self._iter)
        self.position += 1
        return batch


@dataclass
class Session:
    """Everything a run has set up, passed between the phases."""

    cfg: Config
    info: D.DistInfo
    batches: object
    net: nn.Module
    ema: SamplingEMA
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    step_fn: TrainStep | GraphedStep
    build_record: dict
    logger: MetricsLogger
    telemetry: GpuTelemetry
    notes: list[str]
    owns_batches: bool  # built here (so closed here), not handed in by the caller
    execution: ExecutionPlan  # threads, precision, compile: what was decided, and why
    decode: object = None  # a latent run's VAE decode for the sample grids (main rank)


@dataclass
class Progress:
    step: int = 0
    images_seen: int = 0
    skipped: int = 0
    elapsed_before: float = 0.0
    epoch: int = 0
    position: int = 0
    last_ckpt: str | None = None
    last_saved: int = -1
    last_loss: float | None = None
    stopped_by: str = "total_steps"


# ----------------------------------------------------------------------------- set-up


def model_overrides(cfg: Config, batches, device: torch.device) -> dict:
    """cfg.model.overrides plus the data's shape, checked for contradictions."""
    from_data = {"in_channels": int(batches.in_channels), "input_size": int(batches.resolution),
                 "num_classes": int(batches.num_classes)}
    overrides = dict(cfg.model.overrides)
    for key, value in from_data.items():
        if key in overrides and overrides[key] != value:
            raise ConfigError(f"model.overrides.{key} = {overrides[key]!r} contradicts the data "
                              f"({cfg.data.source!r} gives {key} = {value})")
        overrides[key] = value
    if "use_kernels" in overrides:
        raise ConfigError("set the kernel path with run.use_kernels, not model.overrides")
    mode = cfg.run.use_kernels
    overrides["use_kernels"] = mode == "on" or (mode == "auto" and device.type == "cuda")
    return overrides


def autocast_context(cfg: Config, device: torch.device, precision: PrecisionChoice):
    # Graph capture needs autocast's weight-cast cache off (train/graphs.py).
    return precision.autocast(device, cache_enabled=not cfg.run.cuda_graphs)


def plan_run_execution(cfg: Config, device: torch.device, net: nn.Module,
                       planned_steps: int | None) -> ExecutionPlan:
    """Threads, precision and compile for this invocation (train/execution.py), measured
    at the model's width; `planned_steps` is what this invocation will run (None: the
    configured total)."""
    steps = cfg.schedule.total_steps if planned_steps is None else planned_steps
    if 0 < cfg.schedule.max_minutes < COMPILE_MIN_MINUTES:
        steps = 0  # a short time budget cannot repay a compilation
    width = int(getattr(getattr(net, "config", None), "hidden_size", 0) or 256)
    return plan_execution(cfg.run.threads, cfg.run.precision, cfg.run.compile, device, width,
                          steps)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """Each rank's noise and mask stream (the data order comes from the seed alone)."""
    return seed + 1_000_003 * rank


def set_up(cfg: Config, info: D.DistInfo, net: nn.Module | None, batches,
            notes: list[str], planned_steps: int | None = None) -> Session:
    """Data, model (same init on every rank), sampling EMA, wrappers, threads, precision
    and compilation, optimizer, step: what a run trains with. Public so that `sddit bench
    step` and `sddit profile` time and profile exactly the loop's step."""
    device = info.device
    local_batch = cfg.schedule.batch_size // info.world_size
    logger = MetricsLogger(cfg.run.dir, enabled=info.is_main, tensorboard=cfg.run.tensorboard)
    owns_batches = batches is None
    if batches is None:
        from train.data import build_batches

        batches = build_batches(cfg.data, local_batch, rank=info.rank,
                                world_size=info.world_size, seed=cfg.run.seed, device=device)
    seed_everything(cfg.run.seed)
    overrides = {}
    if net is None:
        import model

        overrides = model_overrides(cfg, batches, device)
        net = model.build(cfg.model.name, **overrides)
    net = net.to(device)
    execution = plan_run_execution(cfg, device, net, planned_steps)
    ema = SamplingEMA(net)
    if cfg.run.activation_checkpointing:
        D.apply_activation_checkpointing(net)
    loss_module = D.wrap_for_training(net, info, cfg.distributed.strategy,
                                      cfg.distributed.find_unused_parameters)
    if D.is_sharded(net):  # FSDP2: the EMA is sharded alike, so its update is shard-local
        D.shard_fsdp2(ema.module, info)
    if execution.compile.on:
        loss_module.compile(options=inductor_options(device))
    autocast = autocast_context(cfg, device, execution.precision)
    fused_mode = "off" if cfg.run.cuda_graphs else cfg.run.fused_optimizer
    if wants_fused_optimizer(fused_mode, device, net, D.is_sharded(net)):
        optimizer = build_fused_optimizer(net, ema.module, cfg.optim,
                                          teacher_shadow=isinstance(autocast, torch.autocast))
    else:
        optimizer = build_optimizer([p for p in net.parameters() if p.requires_grad],
                                    cfg.optim, device)
    step_fn = TrainStep(net, loss_module, optimizer, ema, info,
                        StepSettings(cfg.optim.grad_clip, cfg.schedule.batch_size), autocast)
    if cfg.run.cuda_graphs:
        step_fn = GraphedStep(step_fn)
    telemetry = GpuTelemetry(device)
    notes = notes + logger.notes + ([telemetry.note] if telemetry.note else [])
    return Session(cfg, info, batches, net, ema, optimizer, Schedule.from_config(cfg), step_fn,
                   {"name": cfg.model.name, "overrides": overrides}, logger, telemetry, notes,
                   owns_batches, execution)


def _restore(s: Session, state: dict | None) -> Progress:
    """Loads a checkpoint's weights and counters, and puts each rank's RNG where it was."""
    cfg, info = s.cfg, s.info
    progress = Progress()
    rng_states = None
    if state is not None:
        D.load_full_model_state(s.net, state["model"])
        D.load_full_model_state(s.ema.module, state["ema"])
        D.load_full_optimizer_state(s.net, s.optimizer, state["optimizer"])
        if hasattr(s.optimizer, "refresh_shadows"):  # bf16 teacher copies of loaded weights
            s.optimizer.refresh_shadows()
        progress = Progress(step=state["step"], images_seen=state["images_seen"],
                            skipped=state["skipped_steps"], elapsed_before=state["elapsed_s"],
                            epoch=state["data"]["epoch"], position=state["data"]["position"],
                            last_saved=state["step"])
        rng_states = state["rng"]
    s.notes.extend(restore_rng(rng_states, cfg.run.seed, progress.step, info.rank,
                               info.world_size))
    return progress


def restore_rng(rng_states: list | None, seed: int, step: int, rank: int, world_size: int
                ) -> list[str]:
    """Puts this rank's generators where the checkpoint left them. Saved by another number
    of ranks, they cannot be: each rank then gets a new stream of its own (derived from the
    seed, the step and the rank), never a copy of another rank's."""
    seed_everything(rank_seed(seed, rank))
    if rng_states is None:
        return []
    if len(rng_states) == world_size:
        ckpt.restore_rng_state(rng_states[rank])
        return []
    seed_everything(rank_seed(seed + 7_919 * (step + 1), rank))
    return [f"resuming {len(rng_states)}-rank RNG states on {world_size} ranks: each rank "
            "gets its own new stream (not bit-exact)"]


# ----------------------------------------------------------------------------- schedules


class PlannedLength:
    """The number of steps the schedules aim at. A step-bounded run plans total_steps; a
    time-bounded one plans what the rate measured so far fits into the budget (never more
    than total_steps), so its warm-ups and cosines finish inside the budget."""

    MIN_STEPS_TO_MEASURE = 5

    def __init__(self, total: int, max_minutes: float, start_step: int) -> None:
        self.total, self.budget_s, self.start_step = total, max_minutes * 60.0, start_step
        self.start_time = time.monotonic()

    def __call__(self, step: int) -> int:
        done = step - self.start_step
        if self.budget_s <= 0 or done < self.MIN_STEPS_TO_MEASURE:
            return self.total
        elapsed = max(time.monotonic() - self.start_time, 1e-6)
        remaining = max(self.budget_s - elapsed, 0.0)
        return max(step + 1, min(self.total, step + int(done / elapsed * remaining)))

    def over_budget(self) -> bool:
        return self.budget_s > 0 and time.monotonic() - self.start_time >= self.budget_s


# ----------------------------------------------------------------------------- logging


class StatsWindow:
    """Device stat vectors of the steps since the last read, read in one transfer.

    `drain()` is the loop's only device-to-host read between log steps' records: it turns
    the pending vectors into host rows, logs each skipped step, and raises
    NonFiniteLossError when the streak of skipped steps reaches the limit."""

    def __init__(self, s: Session, progress: Progress) -> None:
        self.s, self.p = s, progress
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.rows: list[list[float]] = []  # host rows since the last train record
        self.streak = 0
        self.started = time.monotonic()

    def append(self, step: int, stats: torch.Tensor) -> None:
        self.pending.append((step, stats))

    def drain(self) -> None:
        if not self.pending:
            return
        host = torch.stack([v for _, v in self.pending]).tolist()  # the one read
        steps = [k for k, _ in self.pending]
        self.pending = []
        for step, row in zip(steps, host, strict=True):
            if row[-1] > 0.5:
                self.streak = 0
                self.rows.append(row)
                self.p.last_loss = row[0]
            else:
                self._nonfinite(step, row)

    def _nonfinite(self, step: int, row: list[float]) -> None:
        s = self.s
        self.streak += 1
        self.p.skipped += 1
        s.logger.log({"event": "nonfinite", "step": step, "consecutive": self.streak,
                      "loss": row[0], "grad_norm": row[-2]})
        if s.info.is_main:
            print(f"[sddit] step {step}: non-finite loss or gradient, step skipped "
                  f"({self.streak} in a row)")
        if self.streak >= s.cfg.optim.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{self.streak} consecutive non-finite losses/gradients up to step {step}: "
                "stopping. Lower optim.lr, check the data for NaN/inf, or try "
                "run.precision='fp32'; the last good checkpoint is "
                f"{self.p.last_ckpt or '(none yet)'}")

    def record(self, bar, epoch: int, planned: int) -> None:
        """Drains, then writes one JSONL/TensorBoard record of means since the last one."""
        self.drain()
        s, p = self.s, self.p
        rate = len(self.rows) / max(time.monotonic() - self.started, 1e-9)
        if self.rows:
            mean = torch.tensor(self.rows, dtype=torch.float64).mean(0).tolist()
            names = s.step_fn.part_names or []
            batch = s.cfg.schedule.batch_size
            s.logger.log({"event": "train", "step": p.step, "loss": mean[0],
                          **{f"loss/{k}": v for k, v in zip(names, mean[1:-2], strict=True)},
                          "grad_norm": mean[-2], "lr": s.schedule.at(p.step - 1, planned).lr,
                          "steps_per_s": rate, "images_per_s": rate * batch,
                          "images_seen": p.images_seen, "epoch": epoch, "planned_steps": planned,
                          "skipped_steps": p.skipped, **s.telemetry.read()})
            if bar is not None:
                bar.set_postfix(loss=f"{mean[0]:.4f}", it_s=f"{rate:.2f}",
                                img_s=f"{rate * batch:.0f}")
        self.rows, self.started = [], time.monotonic()


def _progress_bar(cfg: Config, info: D.DistInfo, step: int):
    if not (cfg.run.progress_bar and info.is_main):
        return None
    from tqdm.auto import tqdm

    budget = cfg.schedule.max_minutes
    desc = f"train ({budget:.1f} min budget)" if budget > 0 else "train"
    # A time-bounded run's total is its planned length, updated as the rate is measured.
    return tqdm(total=cfg.schedule.total_steps, initial=step, desc=desc, unit="step",
                dynamic_ncols=True)


# ----------------------------------------------------------------------------- the run


def train(cfg: Config, *, resume: bool | str = False, stop_after: int | None = None,
          net: nn.Module | None = None, batches=None, fresh: bool = False,
          allow_config_change: bool = False) -> TrainResult:
    """Runs (or resumes) training as configured.

    `resume=True` continues from the newest valid checkpoint in cfg.run.dir; a path picks a
    file (or a folder's newest). `fresh` starts over in a folder that holds checkpoints,
    moving them aside. `stop_after` ends this invocation after that many steps (the
    schedules still plan for total_steps). `net` and `batches` replace the configured model
    and data (embedding, tests). Raises ConfigError before any work when the run folder or
    the config does not allow the start asked for (train/resume.py)."""
    if batches is None:
        try:
            cfg.data.validate()
        except FileNotFoundError as exc:
            raise ConfigError(str(exc)) from None
    info = D.init_distributed(cfg.run.device)
    if cfg.schedule.batch_size % info.world_size:
        raise ConfigError(f"schedule.batch_size {cfg.schedule.batch_size} is not divisible "
                          f"by the {info.world_size} ranks")
    check_cuda_graphs(cfg, info.device, info.world_size)
    plan = plan_resume(cfg.run.dir, resume, fresh, info)
    state = ckpt.load_checkpoint(plan.path) if plan.path else None
    notes = list(plan.notes)
    if state is not None:
        notes += config_changes(state["config"], to_dict(cfg), allow_config_change)
    decode = grid_decoder(cfg, info, state)  # before any work: a latent run needs its VAE
    start_step = state["step"] if state is not None else 0
    planned = max(cfg.schedule.total_steps - start_step, 0)
    s = set_up(cfg, info, net, batches, notes,
               planned_steps=planned if stop_after is None else min(planned, stop_after))
    s.decode = decode
    progress = _restore(s, state)
    progress.last_ckpt = plan.path
    del state
    _announce(s, progress, plan.path)
    try:
        # The handlers stay installed through the final save: under torchrun each rank gets
        # its own SIGTERM, and one that lands after the ranks agreed to stop must not kill
        # a rank halfway through the collective save with the default action.
        with StopSignals() as signals:
            try:
                _run_steps(s, progress, stop_after, signals)
            except BaseException:
                s.logger.close()
                raise
            return _shut_down(s, progress, signals)
    finally:
        if s.owns_batches:  # workers and pipelines end with the run, not at exit
            s.batches.close()


def grid_decoder(cfg: Config, info: D.DistInfo, state: dict | None):
    """On the main rank (which draws the sample grids), the VAE decode of a latent run
    (None for pixels); ConfigError naming the folder and data.vae when it cannot load."""
    if not info.is_main:
        return None
    from train.data.latents import run_decoder

    try:
        return run_decoder(cfg.data, info.device, recorded=(state or {}).get("latents"),
                           override=cfg.data.vae or None, flag="--set data.vae=PATH")
    except (OSError, ImportError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def _announce(s: Session, p: Progress, resumed_from: str | None) -> None:
    if not s.info.is_main:
        return
    save_resolved(s.cfg, s.cfg.run.dir, p.step)
    s.logger.log({"event": "start", "step": p.step, "world_size": s.info.world_size,
                  "device": str(s.info.device), "resumed_from": resumed_from,
                  "num_params": sum(q.numel() for q in s.step_fn.params),
                  "data_backend": getattr(s.batches, "backend", "custom"),
                  "execution": s.execution.record(), "notes": s.notes})
    print(f"[sddit] execution: {s.execution.summary()}")
    for note in s.notes:
        print(f"[sddit] {note}")


def _run_steps(s: Session, p: Progress, stop_after: int | None, signals: StopSignals) -> None:
    cfg, sched = s.cfg, s.cfg.schedule
    stream = DataStream(s.batches, p.epoch, p.position)
    planned = PlannedLength(sched.total_steps, sched.max_minutes, p.step)
    window = StatsWindow(s, p)
    bar = _progress_bar(cfg, s.info, p.step)
    start, steps_this_run = time.monotonic(), 0
    try:
        while p.step < sched.total_steps:
            x, y = stream.next()
            plan = planned(p.step)
            stats = s.step_fn(x, y, s.schedule.at(p.step, plan))
            window.append(p.step, stats)
            p.step += 1
            p.images_seen += sched.batch_size
            p.epoch, p.position = stream.epoch, stream.position
            steps_this_run += 1
            if bar is not None:
                if sched.max_minutes > 0:  # a time budget's ETA aims at the planned length
                    bar.total = plan
                bar.update(1)
            _periodic(s, p, window, bar, plan, time.monotonic() - start)
            stopped = _should_stop(s, p, signals, planned, stop_after, steps_this_run)
            if stopped:
                p.stopped_by = stopped
                break
        window.record(bar, p.epoch, planned(p.step))
    finally:
        if bar is not None:
            bar.close()
    p.elapsed_before += time.monotonic() - start


def _periodic(s: Session, p: Progress, window: StatsWindow, bar, plan: int,
              elapsed: float) -> None:
    sched = s.cfg.schedule
    if p.step % sched.log_every == 0 or p.step == sched.total_steps:
        window.record(bar, p.epoch, plan)
    if sched.sample_every and p.step % sched.sample_every == 0:
        _sample_grid(s, p.step)
    if sched.ckpt_every and p.step % sched.ckpt_every == 0:
        window.drain()  # the skipped-step count in the checkpoint must be current
        _save(s, p, p.elapsed_before + elapsed)


def _should_stop(s: Session, p: Progress, signals: StopSignals, planned: PlannedLength,
                 stop_after: int | None, steps_this_run: int) -> str | None:
    """Why to stop after this step, agreed by every rank (host flags only, no GPU sync)."""
    if stop_after is not None and steps_this_run >= stop_after:
        return "stop_after"
    flags = [signals.requested is not None, planned.over_budget()]
    signal_any, budget_any = D.any_rank(flags, s.info)
    if signal_any:
        return "signal"
    return "max_minutes" if budget_any else None


def _shut_down(s: Session, p: Progress, signals: StopSignals) -> TrainResult:
    """The final checkpoint (unless the last step was just saved), the grid and the curve;
    after a signal, only the checkpoint, then TrainingInterrupted."""
    cfg, info = s.cfg, s.info
    try:
        if p.last_saved != p.step:
            _save(s, p, p.elapsed_before)
        interrupted = p.stopped_by == "signal"
        grid = None if interrupted else _sample_grid(s, p.step)
        curve = None
        s.logger.log({"event": "end", "step": p.step, "stopped_by": p.stopped_by,
                      "skipped_steps": p.skipped, "checkpoint": p.last_ckpt})
        if info.is_main and not interrupted:
            curve = plot_loss_curve(read_jsonl(s.logger.path),
                                    os.path.join(cfg.run.dir, "loss_curve.png"))
    finally:
        s.logger.close()
    if interrupted:
        raise TrainingInterrupted(signals.requested or 15, p.last_ckpt)
    checkpoint = p.last_ckpt if p.last_ckpt and os.path.isfile(p.last_ckpt) else None
    return TrainResult(step=p.step, run_dir=cfg.run.dir, checkpoint=checkpoint,
                       metrics=s.logger.path, sample_grid=grid, loss_curve=curve,
                       final_loss=p.last_loss, stopped_by=p.stopped_by, skipped_steps=p.skipped,
                       notes=s.notes)


def _sample_grid(s: Session, step: int) -> str | None:
    """A class-row grid from the sampling EMA, drawn on the main rank. Under FSDP2 every
    rank helps gather the EMA weights into a whole copy first."""
    from train.sample import class_grid

    cfg, info, ema = s.cfg, s.info, s.ema
    if not hasattr(ema.module, "config"):  # a custom net without the sampling interface
        return None
    sampler_net = ema.module
    if D.is_sharded(ema.module):
        state = D.full_model_state(ema.module)
        if not (info.is_main and s.build_record.get("overrides")):
            return None
        sampler_net = ckpt.build_net(s.build_record, info.device)
        sampler_net.load_state_dict(state)
        sampler_net = sampler_net.to(info.device).eval()
    if not info.is_main:
        return None
    rng = ckpt.capture_rng_state()  # sampling must not perturb the training RNG
    try:
        path = os.path.join(cfg.run.dir, "samples", f"step{step:08d}.png")
        num_classes = int(sampler_net.config.num_classes)
        # The run's precision (no compile: a grid is too few samples to repay one).
        fast = accelerated_denoiser(sampler_net, s.execution.precision.name, "off")
        return class_grid(fast, num_classes, cfg.schedule.sample_per_class, path,
                          num_steps=cfg.schedule.sample_steps, seed=cfg.run.seed,
                          decode=s.decode)
    finally:
        ckpt.restore_rng_state(rng)


def weights_finite(net: nn.Module, info: D.DistInfo) -> bool:
    """Every parameter and floating buffer finite, on every rank (one host read)."""
    tensors = [t.to_local() if hasattr(t, "to_local") else t
               for t in list(net.parameters()) + list(net.buffers()) if t.is_floating_point()]
    if not tensors:
        return True
    local = torch.stack([n.float() for n in torch._foreach_norm(tensors)]).isfinite().all()
    return bool(D.all_reduce_mean(local.float().reshape(1), info).item() == 1.0)


def _save(s: Session, p: Progress, elapsed: float) -> None:
    """Every rank calls this (state gathering is collective); rank 0 writes. A state with
    non-finite weights is never saved: the last good checkpoint stays the last."""
    cfg, info = s.cfg, s.info
    if not weights_finite(s.net, info) or not weights_finite(s.ema.module, info):
        s.notes.append(f"step {p.step}: weights are not finite, checkpoint NOT saved; the last "
                       f"good one is {p.last_ckpt or '(none)'}")
        s.logger.log({"event": "nonfinite_weights", "step": p.step, "last_good": p.last_ckpt})
        if info.is_main:
            print(f"[sddit] {s.notes[-1]}")
        p.last_saved = p.step
        return
    model_state = D.full_model_state(s.net)
    ema_state = D.full_model_state(s.ema.module)
    optim_state = D.full_optimizer_state(s.net, s.optimizer)
    rng = D.all_gather_objects(ckpt.capture_rng_state(), info)
    path = None
    if info.is_main:
        payload = {"model": model_state, "ema": ema_state, "optimizer": optim_state,
                   "images_seen": p.images_seen, "skipped_steps": p.skipped,
                   "elapsed_s": elapsed, "rng": rng,
                   "data": {"epoch": p.epoch, "position": p.position},
                   "config": to_dict(cfg), "model_build": s.build_record,
                   "latents": s.decode.spec.record() if s.decode is not None else None}
        path = ckpt.save_checkpoint(cfg.run.dir, p.step, payload, cfg.schedule.keep_last)
    p.last_ckpt = D.broadcast_object(path, info)
    p.last_saved = p.step
