"""FusedAdamWEMA (train/fused_optim.py over sdkernels/optim.py) against its references:
torch.optim.AdamW (single-tensor) for the parameters and moments, torch.lerp for the
teacher and the sampling EMA, over several steps and tensors of awkward sizes.

Tolerance: torch's own AdamW variants differ by about an ulp (its fused kernel against the
single-tensor loop), and under the Triton interpreter fma is unfused where torch's
vectorised lerp fuses it; so each tensor must agree to 4 fp32 ulps of its largest value.
The torch fallback path runs torch's own op sequence and must agree bitwise.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from sdkernels import _lowering_cases, _runtime
from train.fused_optim import FusedAdamWEMA

SHAPES = [(72,), (7, 63), (1152, 3), (1,), (300, 17), (5, 1, 3)]
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
MOMENTUM, BETA = 0.9, 0.8  # large weights, so that the averages move visibly
TEACHER = (0, 2, 3, 5)  # params with a teacher partner
EMA = (0, 1, 2, 4, 5)  # params with a sampling-EMA partner


def _close(actual: torch.Tensor, expected: torch.Tensor, name: str, ulps: float = 4) -> None:
    assert torch.isfinite(actual).all(), name
    bound = ulps * torch.finfo(torch.float32).eps * float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert err <= bound, f"{name}: max error {err:.3e} > {ulps} ulps ({bound:.3e})"


def _setup(teacher_shadow: bool = False):
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    teachers = {i: params[i].detach() + 0.1 * torch.randn(SHAPES[i]) for i in TEACHER}
    emas = {i: params[i].detach() + 0.1 * torch.randn(SHAPES[i]) for i in EMA}
    opt = FusedAdamWEMA(params, **HYPER, teacher_pairs=[(teachers[i], params[i]) for i in TEACHER],
                        ema_pairs=[(emas[i], params[i]) for i in EMA],
                        teacher_shadow=teacher_shadow)
    return params, teachers, emas, opt


def _torch_side(params, teachers, emas):
    """Independent copies updated by torch.optim.AdamW and torch.lerp."""
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = torch.optim.AdamW(ref, **HYPER, foreach=False)
    return ref, {i: t.clone() for i, t in teachers.items()}, \
        {i: e.clone() for i, e in emas.items()}, opt


def _grads(step: int) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(100 + step)
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    if step == 2:
        grads[4] = None  # unused this step: no Adam update, the EMA still moves
    return grads


def _run_both(n_steps: int):
    params, teachers, emas, opt = _setup()
    ref, ref_t, ref_e, ref_opt = _torch_side(params, teachers, emas)
    for k in range(n_steps):
        for p, q, g in zip(params, ref, _grads(k), strict=True):
            p.grad, q.grad = (None, None) if g is None else (g.clone(), g.clone())
        opt.step(teacher_momentum=MOMENTUM, ema_beta=BETA)
        ref_opt.step()
        with torch.no_grad():
            for i in TEACHER:
                ref_t[i].lerp_(ref[i], 1 - MOMENTUM)
            for i in EMA:
                ref_e[i].lerp_(ref[i], 1 - BETA)
    return (params, teachers, emas, opt), (ref, ref_t, ref_e, ref_opt)


def _compare(mine, theirs, ulps: float) -> None:
    (params, teachers, emas, opt), (ref, ref_t, ref_e, ref_opt) = mine, theirs
    for i, (p, q) in enumerate(zip(params, ref, strict=True)):
        _close(p.detach(), q.detach(), f"param {i}", ulps)
        for key in ("exp_avg", "exp_avg_sq"):
            _close(opt.state[p][key], ref_opt.state[q][key], f"{key} {i}", ulps)
        assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"]), f"step {i}"
    for i in TEACHER:
        _close(teachers[i], ref_t[i], f"teacher {i}", ulps)
    for i in EMA:
        _close(emas[i], ref_e[i], f"ema {i}", ulps)


def test_kernel_matches_torch_adamw_and_lerp() -> None:
    assert _runtime.current_backend(torch.zeros(1)) == "triton"
    _compare(*_run_both(5), ulps=4)


def test_torch_fallback_is_torch_bitwise() -> None:
    with _runtime.force_backend("reference"):
        _compare(*_run_both(4), ulps=0)


def test_found_inf_skips_everything_on_device() -> None:
    params, teachers, emas, opt = _setup(teacher_shadow=True)
    for p, g in zip(params, _grads(0), strict=True):
        p.grad = g
    opt.step(teacher_momentum=MOMENTUM, ema_beta=BETA)
    snapshot = [t.clone() for t in (*params, *teachers.values(), *emas.values(),
                                    *(opt.state[p][k] for p in params
                                      for k in ("exp_avg", "exp_avg_sq")),
                                    *(s for _, s in opt.teacher_shadows), opt._steps)]
    opt.step(teacher_momentum=MOMENTUM, ema_beta=BETA, found_inf=torch.ones(()))
    after = [*params, *teachers.values(), *emas.values(),
             *(opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")),
             *(s for _, s in opt.teacher_shadows), opt._steps]
    for i, (a, b) in enumerate(zip(after, snapshot, strict=True)):
        assert torch.equal(a.detach(), b), f"tensor {i} changed on a skipped step"
    opt.step(teacher_momentum=MOMENTUM, ema_beta=BETA, found_inf=torch.zeros(1))
    assert float(opt.state[params[0]]["step"]) == 2.0
    assert not torch.equal(params[0].detach(), snapshot[0])


def test_steps_are_bitwise_deterministic() -> None:
    runs = []
    for _ in range(2):
        torch.manual_seed(1)  # the same draws in _setup for both runs
        (params, teachers, emas, opt), _ = _run_both(3)
        runs.append([*params, *teachers.values(), *emas.values(),
                     *(opt.state[p]["exp_avg_sq"] for p in params)])
    for i, (a, b) in enumerate(zip(*runs, strict=True)):
        assert torch.equal(a.detach(), b.detach()), f"tensor {i} differs between runs"


def test_teacher_shadow_is_written_by_the_same_pass() -> None:
    params, teachers, _, opt = _setup(teacher_shadow=True)
    for k in range(2):
        for p, g in zip(params, _grads(k), strict=True):
            p.grad = g
        opt.step(teacher_momentum=MOMENTUM, ema_beta=BETA)
    shadows = opt.teacher_shadows
    assert len(shadows) == len(TEACHER)
    for t, s in shadows:
        assert s.dtype == torch.bfloat16
        # One bf16 ulp: the interpreter truncates fp32 -> bf16 where a GPU rounds.
        _close(s.float(), t.bfloat16().float(), "shadow", ulps=2 ** 16)
        assert float((s.float() - t).abs().max()) > 0 or t.abs().max() == 0  # really bf16


def _checkpoint(state: dict) -> dict:
    """A round trip through torch.save, as a checkpoint makes (no shared tensors)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_state_dict_loads_into_torch_adamw_and_back() -> None:
    (params, _, _, opt), (ref, _, _, ref_opt) = _run_both(2)
    state = _checkpoint(opt.state_dict())
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    again = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], **HYPER)
    again.load_state_dict(state)
    for i, q in enumerate(again.param_groups[0]["params"]):
        assert torch.equal(again.state[q]["exp_avg"], opt.state[params[i]]["exp_avg"])
    fresh = FusedAdamWEMA([torch.nn.Parameter(q.detach().clone()) for q in ref], **HYPER)
    fresh.load_state_dict(_checkpoint(ref_opt.state_dict()))
    for i, p in enumerate(fresh.param_groups[0]["params"]):
        assert float(fresh.state[p]["step"]) == float(ref_opt.state[ref[i]]["step"])
        assert fresh.state[p]["step"].data_ptr() == fresh._steps[i].data_ptr()
    # Both continue identically from the loaded state.
    for p, q, g in zip(fresh.param_groups[0]["params"], ref, _grads(7), strict=True):
        p.grad, q.grad = g.clone(), g.clone()
    fresh.step()
    ref_opt.step()
    for i, (p, q) in enumerate(zip(fresh.param_groups[0]["params"], ref, strict=True)):
        _close(p.detach(), q.detach(), f"param {i} after reload")


def test_table_is_built_once_and_grads_refreshed() -> None:
    params, _, _, opt = _setup()
    for k in range(3):
        for p, g in zip(params, _grads(0), strict=True):
            p.grad = g  # fresh grad tensors: new addresses each step
        opt.step()
        if k == 0:
            table = opt._table
            groups = len(table.groups)
    assert opt._table is table and len(table.groups) == groups
    uploaded = {i: ptr for g in table.groups for i, ptr in zip(g.index, g.grad_ptrs,
                                                              strict=True)}
    assert uploaded == {i: p.grad.data_ptr() for i, p in enumerate(params)}
    for g in table.groups:
        assert g.grads.tolist() == list(g.grad_ptrs)
    params[4].grad = None  # a grad vanishes: the groups are rebuilt around it
    opt.step()
    assert 4 not in {i for g in table.groups if g.flags[0] for i in g.index}


def test_bad_arguments_name_what_is_wrong() -> None:
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    stranger = torch.nn.Parameter(torch.randn(5))
    with pytest.raises(ValueError, match=r"teacher_pairs\[0\].*not among"):
        FusedAdamWEMA(params, lr=1e-3, teacher_pairs=[(torch.randn(5), stranger)])
    with pytest.raises(ValueError, match=r"ema_pairs\[0\]: shape"):
        FusedAdamWEMA(params, lr=1e-3, ema_pairs=[(torch.randn(3, 4), params[0])])
    with pytest.raises(TypeError, match=r"params\[0\] must be a contiguous float32"):
        FusedAdamWEMA([torch.nn.Parameter(torch.randn(3).half())], lr=1e-3)
    with pytest.raises(ValueError, match="betas"):
        FusedAdamWEMA(params, lr=1e-3, betas=(0.9, 1.0))
    opt = FusedAdamWEMA(params, lr=1e-3)
    with pytest.raises(ValueError, match="teacher_momentum"):
        opt.step(teacher_momentum=1.5)


def test_lowering_cases_cover_the_training_variants() -> None:
    names = {c.name for c in _lowering_cases.optim_cases()}
    assert {"optim.adamw_ema.all", "optim.adamw_ema.ema", "optim.adamw_ema.no_grad"} <= names


def test_teacher_forward_reads_the_shadow_without_weight_casts() -> None:
    """Inside teacher_in_bf16 the teacher's weights are the bf16 shadows: autocast casts no
    weight; outside, the fp32 teacher the kernel updates is back in place."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class WeightCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].dim() == 2:
                self.count += 1
            return func(*args, **(kwargs or {}))

    student, teacher = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    opt = FusedAdamWEMA(student.parameters(), lr=1e-2, teacher_shadow=True,
                        teacher_pairs=zip(teacher.parameters(), student.parameters(),
                                          strict=True))
    x = torch.randn(2, 4, 16)  # 3-D: only the weight is a 2-D cast
    for shadowed, expected_casts in ((False, 1), (True, 0)):
        mode = WeightCasts()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), mode:
            if shadowed:
                with opt.teacher_in_bf16():
                    assert teacher.weight.dtype == torch.bfloat16
                    out = teacher(x)
            else:
                out = teacher(x)
        assert mode.count == expected_casts and out.dtype == torch.bfloat16
    assert teacher.weight.dtype == torch.float32
    with opt.teacher_in_bf16():  # no bf16 autocast: fp32 weights stay, as fp32 math needs
        assert teacher.weight.dtype == torch.float32
    student.weight.grad, student.bias.grad = torch.randn(8, 16), torch.randn(8)
    opt.step(teacher_momentum=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16), opt.teacher_in_bf16():
        assert torch.equal(teacher.weight, opt.teacher_shadows[0][1])
    # The update reached the module's fp32 teacher and its shadow (one bf16 rounding).
    assert not torch.equal(teacher.weight, student.weight)
    _close(opt.teacher_shadows[0][1].float(), teacher.weight.detach(), "shadow", ulps=2 ** 16)


@pytest.mark.timeout(120)
def test_replaces_adamw_update_teacher_and_ema_on_a_tiny_sddit() -> None:
    """One pass equals today's three calls on a real SD-DiT: optimizer.step(),
    net.update_teacher(m) (foreach mul + add: within an ulp of lerp) and ema.update."""
    import model
    from train.ema import SamplingEMA
    from train.fused_optim import sddit_pairs

    torch.manual_seed(0)
    nets = [model.build("SD-DiT-tiny", input_size=8) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    emas = [SamplingEMA(n) for n in nets]
    trainable = [[p for p in n.parameters() if p.requires_grad] for n in nets]
    teacher_pairs, ema_pairs = sddit_pairs(nets[0], emas[0].module)
    assert len(teacher_pairs) > 0 and len(ema_pairs) == len(trainable[0])
    fused = FusedAdamWEMA(trainable[0], **HYPER, teacher_pairs=teacher_pairs,
                          ema_pairs=ema_pairs)
    plain = torch.optim.AdamW(trainable[1], **HYPER, foreach=False)
    x0, y = torch.randn(2, 1, 8, 8), torch.randint(0, 10, (2,))
    for _ in range(2):
        for p, q in zip(*trainable, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        fused.step(teacher_momentum=MOMENTUM, ema_beta=BETA)
        plain.step()
        nets[1].update_teacher(MOMENTUM)
        emas[1].update(nets[1], BETA)
    for (name, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values(),
                            strict=True):
        _close(a, b, name, ulps=8)
    for (name, a), b in zip(emas[0].module.state_dict().items(),
                            emas[1].module.state_dict().values(), strict=True):
        _close(a, b, f"ema {name}", ulps=8)
    # The teacher's forward on the shadows gives what autocast's casts of fp32 gave: the
    # shadows are those casts (up to the interpreter's truncating bf16 store).
    fused.refresh_shadows()  # round to nearest, exactly as autocast's casts
    losses, buffers = [], {n: b.clone() for n, b in nets[0].named_buffers()}
    for shadowed in (False, True):
        torch.manual_seed(3)
        for name, b in nets[0].named_buffers():  # the loss updates the teacher centre
            b.copy_(buffers[name])
        context = fused.teacher_in_bf16() if shadowed else contextlib.nullcontext()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), context:
            losses.append(nets[0].training_losses(x0, y)["dis"])
    assert torch.isfinite(losses[1]) and torch.equal(losses[0], losses[1])


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_gpu_matches_torch_and_never_syncs_the_host() -> None:
    """On CUDA: the same agreement with torch.optim.AdamW + lerp, and steady-state steps
    (grads moving, found_inf given) make no host-device synchronisation."""
    dev = torch.device("cuda")
    shapes = [(1152, 3456), (1152,), (7, 63), (1,)]
    params = [torch.nn.Parameter(torch.randn(s, device=dev)) for s in shapes]
    teachers = [p.detach() + 0.1 * torch.randn_like(p) for p in params]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    ref_t = [t.clone() for t in teachers]
    opt = FusedAdamWEMA(params, **HYPER, teacher_pairs=list(zip(teachers, params, strict=True)),
                        teacher_shadow=True)
    ref_opt = torch.optim.AdamW(ref, **HYPER, foreach=False)
    found_inf = torch.zeros(1, device=dev)
    for k in range(4):
        for p, q in zip(params, ref, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        if k >= 1:  # the first step builds the tables (small blocking copies)
            torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step(teacher_momentum=MOMENTUM, found_inf=found_inf)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref_opt.step()
        with torch.no_grad():
            for t, q in zip(ref_t, ref, strict=True):
                t.lerp_(q, 1 - MOMENTUM)
    for i, (p, q, t, rt) in enumerate(zip(params, ref, teachers, ref_t, strict=True)):
        _close(p.detach(), q.detach(), f"param {i}", ulps=4)
        _close(t, rt, f"teacher {i}", ulps=4)
