"""The training loop.

One step: forward through the loss module (DDP/FSDP-wrapped where distributed), backward,
gradient-norm (clipped when asked), a finiteness check agreed by every rank, then
    optimizer step -> SD-DiT teacher momentum update -> sampling EMA update.
A non-finite loss or gradient skips the optimizer step (the batch is consumed) and is
logged; `optim.max_consecutive_nonfinite` of them in a row stop the run.

Resume is exact: the checkpoint carries the step, every rank's RNG states and the data
position (epoch, batches consumed), and on resume the data is fast-forwarded before the
RNG states are restored, so the continued run draws what the uninterrupted one would.
"""

from __future__ import annotations

import contextlib
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
from train.ema import SamplingEMA, ema_beta
from train.logging_utils import GpuTelemetry, MetricsLogger, plot_loss_curve, read_jsonl
from train.optim import build_optimizer, learning_rate, set_learning_rate


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses or gradients in a row."""


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
        self.batches, self.epoch, self.position = batches, epoch, 0
        self._iter: Iterator | None = None
        self._start_epoch()
        for _ in range(position):  # fast-forward a resumed epoch
            self.next()

    def _start_epoch(self) -> None:
        self.batches.set_epoch(self.epoch)
        self._iter = iter(self.batches)
        self.position = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            batch = next(self._iter)
        except StopIteration:
            self.epoch += 1
            self._start_epoch()
            batch = next(self._iter)
        self.position += 1
        return batch


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


def autocast_context(cfg: Config, device: torch.device):
    precision = cfg.run.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm, clipping to max_norm when > 0 (DTensor-aware via torch)."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf"))
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def train(cfg: Config, *, resume: bool | str = False, stop_after: int | None = None,
          net: nn.Module | None = None, batches=None) -> TrainResult:
    """Runs (or resumes) training as configured. `resume=True` continues from the newest
    checkpoint in cfg.run.dir; a path picks a file. `stop_after` ends this invocation after
    that many optimizer steps. `net` and `batches` replace the configured model and data
    (embedding, tests)."""
    info = D.init_distributed(cfg.run.device)
    device = info.device
    sched = cfg.schedule
    if sched.batch_size % info.world_size:
        raise ConfigError(f"schedule.batch_size {sched.batch_size} is not divisible by the "
                          f"{info.world_size} ranks")
    local_batch = sched.batch_size // info.world_size
    run_dir = cfg.run.dir
    logger = MetricsLogger(run_dir, enabled=info.is_main, tensorboard=cfg.run.tensorboard)
    notes = list(logger.notes)

    if batches is None:
        from train.data import build_batches

        batches = build_batches(cfg.data, local_batch, rank=info.rank,
                                world_size=info.world_size, seed=cfg.run.seed, device=device)
    seed_everything(cfg.run.seed)  # same init on every rank
    if net is None:
        import model

        overrides = model_overrides(cfg, batches, device)
        net = model.build(cfg.model.name, **overrides)
    else:
        overrides = {}
    net = net.to(device)
    build_record = {"name": cfg.model.name, "overrides": overrides}
    ema = SamplingEMA(net)
    if cfg.run.activation_checkpointing:
        D.apply_activation_checkpointing(net)
    loss_module = D.wrap_for_training(net, info, cfg.distributed.strategy,
                                      cfg.distributed.find_unused_parameters)
    if D.is_sharded(net):  # FSDP2: the EMA is sharded alike, so its update is shard-local
        D.shard_fsdp2(ema.module, info)
    if cfg.run.compile:
        loss_module.compile()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim, device)

    step, images_seen, skipped, elapsed_before = 0, 0, 0, 0.0
    epoch, position, rng_states = 0, 0, None
    resume_from = None
    if resume:
        resume_from = ckpt.latest_checkpoint(run_dir if resume is True else str(resume))
        if resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir}")
        state = ckpt.load_checkpoint(resume_from)
        D.load_full_model_state(net, state["model"])
        D.load_full_model_state(ema.module, state["ema"])
        D.load_full_optimizer_state(net, optimizer, state["optimizer"])
        step, images_seen = state["step"], state["images_seen"]
        skipped, elapsed_before = state["skipped_steps"], state["elapsed_s"]
        epoch, position = state["data"]["epoch"], state["data"]["position"]
        rng_states = state["rng"]
        if len(rng_states) != info.world_size:
            notes.append(f"resuming {len(rng_states)}-rank RNG states on {info.world_size} "
                         "ranks: the run continues but not bit-exactly")
        del state
    # Each rank draws its own noise and masks; the data order comes from the seed alone.
    seed_everything(cfg.run.seed + 1_000_003 * info.rank)
    stream = DataStream(batches, epoch, position)
    if rng_states is not None:  # after the fast-forward, which may draw random numbers
        ckpt.restore_rng_state(rng_states[min(info.rank, len(rng_states) - 1)])
    if info.is_main:
        save_resolved(cfg, run_dir)
        logger.log({"event": "start", "step": step, "world_size": info.world_size,
                    "device": str(device), "resumed_from": resume_from,
                    "num_params": sum(p.numel() for p in params),
                    "data_backend": getattr(batches, "backend", "custom")})

    telemetry = GpuTelemetry(device)
    if telemetry.note:
        notes.append(telemetry.note)
    for note in notes:
        if info.is_main:
            print(f"[sddit] {note}")

    import model as model_lib

    total = sched.total_steps
    start_time = time.monotonic()
    last_saved = step if resume_from else -1
    last_ckpt = resume_from
    streak = 0
    window: list[torch.Tensor] = []
    window_start = time.monotonic()
    last_loss, stopped_by, part_names = None, "total_steps", None
    bar = _progress_bar(cfg, info, step, total)
    autocast = autocast_context(cfg, device)
    steps_this_run = 0
    # Buffers a forward may update (SD-DiT's center): restored when a step is skipped, so
    # a bad batch leaves no trace.
    buffers = [b for b in net.buffers() if b.is_floating_point()]
    buffer_snapshot = [b.detach().clone() for b in buffers]
    try:
        while step < total:
            x, y = stream.next()
            net.set_progress(step, total)
            set_learning_rate(optimizer, learning_rate(cfg.optim, step))
            if buffers:
                torch._foreach_copy_(buffer_snapshot, buffers)
            with autocast:
                losses = loss_module(x, y)
            losses["loss"].backward()
            grad_norm = _grad_norm(params, cfg.optim.grad_clip)
            if part_names is None:
                part_names = sorted(k for k in losses if k != "loss")
            budget_over = float(sched.max_minutes > 0 and (
                time.monotonic() - start_time) / 60 >= sched.max_minutes)
            local = torch.stack([losses["loss"].detach().float()]
                                + [losses[k].detach().float().reshape(()) for k in part_names]
                                + [grad_norm.detach().float().to(device),
                                   torch.tensor(budget_over, device=device)])
            finite_flag = torch.isfinite(local).all().float().reshape(1)
            stats = D.all_reduce_mean(torch.cat([local.nan_to_num(0.0), finite_flag]), info)
            host = stats.tolist()  # the step's one device-to-host sync
            all_finite = host[-1] == 1.0
            if not all_finite:
                optimizer.zero_grad(set_to_none=True)
                if buffers:
                    torch._foreach_copy_(buffers, buffer_snapshot)
                streak += 1
                skipped += 1
                logger.log({"event": "nonfinite", "step": step, "consecutive": streak,
                            "loss": float(local[0]), "grad_norm": float(local[-2])})
                if info.is_main:
                    print(f"[sddit] step {step}: non-finite loss or gradient, step skipped "
                          f"({streak} in a row)")
                if streak >= cfg.optim.max_consecutive_nonfinite:
                    raise NonFiniteLossError(
                        f"{streak} consecutive non-finite losses/gradients at step {step}: "
                        "stopping. Lower optim.lr, check the data for NaN/inf, or try "
                        "run.precision='fp32'; the last good checkpoint is "
                        f"{last_ckpt or '(none yet)'}")
                continue
            streak = 0
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            net.update_teacher(model_lib.teacher_momentum(step, total))
            ema.update(net, ema_beta(cfg.ema, images_seen, sched.batch_size))
            step += 1
            steps_this_run += 1
            images_seen += sched.batch_size
            window.append(stats[:-1])
            last_loss = host[0]
            if bar is not None:
                bar.update(1)

            if step % sched.log_every == 0 or step == total:
                _log_window(logger, bar, window, window_start, part_names, cfg, step,
                            images_seen, stream.epoch, skipped, telemetry)
                window, window_start = [], time.monotonic()
            if sched.sample_every and step % sched.sample_every == 0:
                _sample_grid(cfg, info, ema, step, build_record)
            if sched.ckpt_every and step % sched.ckpt_every == 0:
                last_ckpt = _save(cfg, info, net, ema, optimizer, step, images_seen, skipped,
                                  elapsed_before + time.monotonic() - start_time, stream,
                                  build_record)
                last_saved = step
            if stop_after is not None and steps_this_run >= stop_after:
                stopped_by = "stop_after"
                break
            if host[-2] > 0:
                stopped_by = "max_minutes"
                break
    except BaseException:
        logger.close()
        raise
    finally:
        if bar is not None:
            bar.close()
    if window:  # stopped between log intervals
        _log_window(logger, None, window, window_start, part_names, cfg, step, images_seen,
                    stream.epoch, skipped, telemetry)

    if last_saved != step:
        last_ckpt = _save(cfg, info, net, ema, optimizer, step, images_seen, skipped,
                          elapsed_before + time.monotonic() - start_time, stream, build_record)
    grid = _sample_grid(cfg, info, ema, step, build_record)
    curve = None
    if info.is_main:
        logger.log({"event": "end", "step": step, "stopped_by": stopped_by,
                    "skipped_steps": skipped})
        curve = plot_loss_curve(read_jsonl(logger.path), os.path.join(run_dir, "loss_curve.png"))
    logger.close()
    return TrainResult(step=step, run_dir=run_dir, checkpoint=last_ckpt, metrics=logger.path,
                       sample_grid=grid, loss_curve=curve, final_loss=last_loss,
                       stopped_by=stopped_by, skipped_steps=skipped, notes=notes)


def _log_window(logger: MetricsLogger, bar, window: list[torch.Tensor], window_start: float,
                part_names: list[str], cfg: Config, step: int, images_seen: int, epoch: int,
                skipped: int, telemetry: GpuTelemetry) -> None:
    """One JSONL/TensorBoard record: means over the steps since the last record."""
    batch = cfg.schedule.batch_size
    mean = torch.stack(window).mean(0).tolist()  # [loss, parts..., grad_norm, budget flag]
    rate = len(window) / max(time.monotonic() - window_start, 1e-9)
    logger.log({"event": "train", "step": step, "loss": mean[0],
                **{f"loss/{k}": v for k, v in zip(part_names, mean[1:-2], strict=True)},
                "grad_norm": mean[-2], "lr": learning_rate(cfg.optim, step - 1),
                "steps_per_s": rate, "images_per_s": rate * batch, "images_seen": images_seen,
                "epoch": epoch, "skipped_steps": skipped, **telemetry.read()})
    if bar is not None:
        bar.set_postfix(loss=f"{mean[0]:.4f}", it_s=f"{rate:.2f}", img_s=f"{rate * batch:.0f}")


def _progress_bar(cfg: Config, info: D.DistInfo, step: int, total: int):
    if not (cfg.run.progress_bar and info.is_main):
        return None
    from tqdm.auto import tqdm

    budget = cfg.schedule.max_minutes
    if budget > 0:  # a time-bounded run: an ETA towards total_steps would mislead
        return tqdm(initial=step, desc=f"train ({budget:.1f} min budget)", unit="step",
                    dynamic_ncols=True)
    return tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)


def _sample_grid(cfg: Config, info: D.DistInfo, ema: SamplingEMA, step: int,
                 build_record: dict) -> str | None:
    """A class-row grid from the sampling EMA, drawn on the main rank. Under FSDP2 every
    rank helps gather the EMA weights into a whole copy first."""
    from train.sample import class_grid

    if not hasattr(ema.module, "config"):  # a custom net without the sampling interface
        return None
    sampler_net = ema.module
    if D.is_sharded(ema.module):
        state = D.full_model_state(ema.module)
        if not (info.is_main and build_record.get("overrides")):
            return None
        sampler_net = ckpt.build_net(build_record, info.device)
        sampler_net.load_state_dict(state)
        sampler_net = sampler_net.to(info.device).eval()
    if not info.is_main:
        return None
    state = ckpt.capture_rng_state()  # sampling must not perturb the training RNG
    try:
        path = os.path.join(cfg.run.dir, "samples", f"step{step:08d}.png")
        return class_grid(sampler_net, int(sampler_net.config.num_classes),
                          cfg.schedule.sample_per_class, path,
                          num_steps=cfg.schedule.sample_steps, seed=cfg.run.seed)
    finally:
        ckpt.restore_rng_state(state)


def _save(cfg: Config, info: D.DistInfo, net: nn.Module, ema: SamplingEMA,
          optimizer: torch.optim.Optimizer, step: int, images_seen: int, skipped: int,
          elapsed: float, stream: DataStream, build_record: dict) -> str | None:
    """Every rank calls this (state gathering is collective); rank 0 writes."""
    model_state = D.full_model_state(net)
    ema_state = D.full_model_state(ema.module)
    optim_state = D.full_optimizer_state(net, optimizer)
    rng = D.all_gather_objects(ckpt.capture_rng_state(), info)
    path = None
    if info.is_main:
        payload = {"model": model_state, "ema": ema_state, "optimizer": optim_state,
                   "images_seen": images_seen, "skipped_steps": skipped, "elapsed_s": elapsed,
                   "rng": rng, "data": {"epoch": stream.epoch, "position": stream.position},
                   "config": to_dict(cfg), "model_build": build_record}
        path = ckpt.save_checkpoint(cfg.run.dir, step, payload, cfg.schedule.keep_last)
    D.barrier(info)
    return path
