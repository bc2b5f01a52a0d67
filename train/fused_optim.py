"""`FusedAdamWEMA`: AdamW, SD-DiT's teacher momentum update and the sampling EMA in one
multi-tensor kernel pass per step (`sdkernels.optim`), with the torch reference as the
fallback where Triton cannot run.

Use (the loop's order of updates, in one call):

    opt = FusedAdamWEMA(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                        teacher_pairs=net.teacher_pairs(),
                        ema_pairs=zip(ema_params, live_params), teacher_shadow=True)
    loss.backward()
    opt.step(lr, teacher_momentum=m, ema_beta=beta, found_inf=found_inf)
    opt.zero_grad()

It replaces `optimizer.step()`, `net.update_teacher(m)` and `ema.update(net, beta)`: the
teacher and EMA tensors are updated from the new parameter values, exactly as if those
three ran in that order (AdamW as `torch.optim.AdamW`, both averages as `torch.lerp`).
`found_inf` (a device tensor, nonzero = skip) skips the whole step on the device, with no
host sync. With `teacher_shadow=True` it also keeps a bf16 copy of every teacher tensor
(`teacher_shadows`), written by the same pass, for a teacher forward that would otherwise
cast its fp32 weights to bf16 on every call: run that forward inside
`with opt.teacher_in_bf16():`, which points each teacher parameter at its shadow (no copy)
and back afterwards.

Checkpoint format: `state_dict()` is `torch.optim.Optimizer`'s, the same layout as
`torch.optim.AdamW` ({"state": {i: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups":
[{"lr", "betas", "eps", "weight_decay", "params"}]}), so either optimizer can load the
other's checkpoint. "step" is a float32 scalar on the parameters' device. The teacher and
EMA tensors belong to their modules and are checkpointed with them; call
`refresh_shadows()` after loading teacher weights.

Limits: one parameter group; fp32, contiguous, non-distributed (no DTensor) parameters,
teacher and EMA tensors (with FSDP2, use torch.optim.AdamW).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from sdkernels import _runtime
from sdkernels import optim as kernels

Pair = tuple[torch.Tensor, torch.Tensor]


class FusedAdamWEMA(torch.optim.Optimizer):
    def __init__(self, params: Iterable[nn.Parameter], *, lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, teacher_pairs: Iterable[Pair] = (),
                 ema_pairs: Iterable[Pair] = (), teacher_shadow: bool = False) -> None:
        params = list(params)
        if not params:
            raise ValueError("params is empty: FusedAdamWEMA needs at least one parameter")
        if not all(0.0 < b < 1.0 for b in betas) or lr < 0 or eps <= 0 or weight_decay < 0:
            raise ValueError(f"need 0 < betas < 1, lr >= 0, eps > 0, weight_decay >= 0; got "
                             f"betas={betas}, lr={lr}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))
        if len(self.param_groups) != 1:
            raise ValueError("FusedAdamWEMA takes one parameter group (a list of tensors)")
        self._params: list[nn.Parameter] = self.param_groups[0]["params"]
        for i, p in enumerate(self._params):
            _check_plain_fp32(f"params[{i}]", p)
        teacher_pairs = list(teacher_pairs)
        self._teacher = self._pair_up("teacher_pairs", teacher_pairs)
        self._teacher_params = [t for t, _ in teacher_pairs]  # the modules' own tensors
        self._ema = self._pair_up("ema_pairs", ema_pairs)
        self._shadow = [t.detach().to(torch.bfloat16) if teacher_shadow and t is not None
                        else None for t in self._teacher]
        self._init_state()

    # ------------------------------------------------------------------ set-up
    def _pair_up(self, what: str, pairs: Iterable[Pair]) -> list[torch.Tensor | None]:
        """[partner of params[i] or None]: each pair is (average tensor, trained param)."""
        index = {id(p): i for i, p in enumerate(self._params)}
        partners: list[torch.Tensor | None] = [None] * len(self._params)
        for k, (avg, param) in enumerate(pairs):
            i = index.get(id(param))
            if i is None:
                raise ValueError(f"{what}[{k}]: its parameter (shape {list(param.shape)}) is "
                                 "not among the optimizer's params")
            if partners[i] is not None:
                raise ValueError(f"{what}[{k}]: params[{i}] already has a partner")
            _check_plain_fp32(f"{what}[{k}][0]", avg)
            if avg.shape != param.shape or avg.device != param.device:
                raise ValueError(f"{what}[{k}]: shape {list(avg.shape)} on {avg.device} does "
                                 f"not match its param {list(param.shape)} on {param.device}")
            partners[i] = avg.detach()
        return partners

    def _init_state(self) -> None:
        device = self._params[0].device
        self._steps = torch.zeros(len(self._params), dtype=torch.float32, device=device)
        for i, p in enumerate(self._params):
            self.state[p] = {"step": self._steps[i],
                             "exp_avg": torch.zeros_like(p, memory_format=torch.contiguous_format),
                             "exp_avg_sq": torch.zeros_like(p,
                                                            memory_format=torch.contiguous_format)}
        self._table: kernels.MultiTensorTable | None = None

    def _tensor_sets(self) -> list[dict[str, torch.Tensor | None]]:
        return [{"param": p.detach(), "grad": p.grad, "exp_avg": self.state[p]["exp_avg"],
                 "exp_avg_sq": self.state[p]["exp_avg_sq"], "teacher": self._teacher[i],
                 "ema": self._ema[i], "shadow": self._shadow[i]}
                for i, p in enumerate(self._params)]

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, lr: float | None = None, teacher_momentum: float = 1.0,  # type: ignore[override]
             ema_beta: float = 1.0, found_inf: torch.Tensor | None = None) -> None:
        """AdamW at `lr` (default: the group's), then teacher <- lerp(teacher, p,
        1 - teacher_momentum) and ema <- lerp(ema, p, 1 - ema_beta) with the new p.
        A nonzero `found_inf` skips all of it on the device."""
        group = self.param_groups[0]
        if lr is not None:
            group["lr"] = lr
        for name, value in (("teacher_momentum", teacher_momentum), ("ema_beta", ema_beta)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if found_inf is not None:
            found_inf = found_inf.detach().to(torch.float32).reshape(1)
        beta1, beta2 = group["betas"]
        scalars = kernels.StepScalars(group["lr"], beta1, beta2, group["eps"],
                                      group["weight_decay"], teacher_momentum, ema_beta)
        if not _runtime.use_triton(self._params[0]):
            kernels.adamw_ema_ref(self._tensor_sets(), self._steps, scalars, found_inf)
            return
        if self._table is None:
            self._table = kernels.build_table(self._tensor_sets())
        else:  # per step: only the grads are new
            for tensors, p in zip(self._table.tensors, self._params, strict=True):
                tensors["grad"] = p.grad
            kernels.refresh_grads(self._table)
        kernels.adamw_ema_step(self._table, self._steps, scalars, found_inf)

    # ------------------------------------------------------------------ shadows, state
    @property
    def teacher_shadows(self) -> list[Pair]:
        """(fp32 teacher tensor, its bf16 shadow) for every teacher tensor."""
        return [(t, s) for t, s in zip(self._teacher, self._shadow, strict=True)
                if t is not None and s is not None]

    @contextmanager
    def teacher_in_bf16(self) -> Iterator[None]:
        """Inside the block each teacher parameter's data is its bf16 shadow, so autocast
        finds bf16 weights and casts nothing; outside it is the fp32 tensor the optimizer
        updates. For the no-grad teacher forward only, and only under bf16 autocast (which
        accepts bf16 weights everywhere): without it the block changes nothing."""
        device_type = self._params[0].device.type
        if not (torch.is_autocast_enabled(device_type)
                and torch.get_autocast_dtype(device_type) == torch.bfloat16):
            yield
            return
        shadow_of = {t.data_ptr(): s for t, s in self.teacher_shadows}
        swapped = []
        for t in self._teacher_params:
            shadow = shadow_of.get(t.data_ptr())
            if shadow is not None:
                swapped.append((t, t.data))
                t.data = shadow
        try:
            yield
        finally:
            for t, data in swapped:
                t.data = data

    @torch.no_grad()
    def refresh_shadows(self) -> None:
        """Copy every teacher tensor into its shadow (after loading teacher weights)."""
        for t, s in self.teacher_shadows:
            s.copy_(t)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader, then the step counts gathered back into one device buffer and
        the kernel tables rebuilt (the state tensors are new objects)."""
        super().load_state_dict(state_dict)
        steps = [torch.as_tensor(self.state[p].get("step", 0.0), dtype=torch.float32)
                 for p in self._params]
        self._steps = torch.stack([s.reshape(()).to(self._steps.device) for s in steps])
        for i, p in enumerate(self._params):
            state = self.state[p]
            state["step"] = self._steps[i]
            for key in ("exp_avg", "exp_avg_sq"):
                if key not in state:
                    state[key] = torch.zeros_like(p)
                state[key] = state[key].to(torch.float32).contiguous()
        self._table = None


def sddit_pairs(net: nn.Module, ema_module: nn.Module | None = None
                ) -> tuple[list[Pair], list[Pair]]:
    """(teacher_pairs, ema_pairs) for a net from `model.build`: the teacher's tensors with
    the student tensors `net.update_teacher` averages (none without a teacher), and the
    sampling EMA copy's parameters with the net's trainable parameters of the same name,
    as `train.ema.SamplingEMA.update` pairs them (none without `ema_module`)."""
    teacher_pairs: list[Pair] = net.teacher_pairs()
    ema_pairs: list[Pair] = []
    if ema_module is not None:
        from train.ema import clean_name

        mine = dict(ema_module.named_parameters())
        for name, p in net.named_parameters():
            if p.requires_grad:
                ema_pairs.append((mine[clean_name(name)], p))
    return teacher_pairs, ema_pairs


def _check_plain_fp32(name: str, t: torch.Tensor) -> None:
    if hasattr(t, "to_local"):
        raise TypeError(f"{name} is a distributed tensor: FusedAdamWEMA supports plain "
                        "tensors only (use torch.optim.AdamW with FSDP2)")
    if t.dtype != torch.float32 or not t.is_contiguous():
        raise TypeError(f"{name} must be a contiguous float32 tensor, got {t.dtype} "
                        f"(contiguous={t.is_contiguous()})")
