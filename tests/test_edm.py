"""sdkernels.edm: fused EDM preconditioning and loss against the pure-torch reference.

Truth is the reference in fp64 from the same rounded inputs and upstream grads; fp16/bf16
results must be within 2x of torch's own error in that dtype (tests/numerics.py). Every
launcher allocation is poisoned with NaN, so an element a kernel forgets shows up.
"""

from __future__ import annotations

import pytest
import torch
from numerics import assert_close_fp32, assert_matches

from sdkernels import _runtime
from sdkernels.edm import (
    EDMLossFunction,
    EDMPreconditionFunction,
    edm_loss,
    edm_loss_ref,
    edm_precondition,
    edm_precondition_ref,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIGMA_MIN = 0.002


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    with _runtime.poison_outputs():
        yield


def edm_sigma(batch: int) -> torch.Tensor:
    """EDM's training distribution: log-normal with P_mean -1.2, P_std 1.2."""
    return torch.exp(-1.2 + 1.2 * torch.randn(batch))


def leaves(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def run_with_grads(fn, inputs: list[torch.Tensor], upstream: list[torch.Tensor]):
    """Outputs of fn(*inputs) and the gradients of every input."""
    xs = leaves(*inputs)
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, upstream)
    return outs, [x.grad for x in xs]


def compare(actual, lowp, truth, names: list[str]) -> None:
    for a, lp, t, name in zip(actual, lowp, truth, names, strict=True):
        assert_matches(a.detach(), lp.detach(), t.detach(), name)


def patch_weights(batch: int, length: int, kind: str) -> torch.Tensor:
    """[B, L] weights: 'keep:K' keeps exactly K random patches (0/1), 'random' is in (0.1, 1.1)."""
    if kind == "random":
        return torch.rand(batch, length) + 0.1
    keep = int(kind.split(":")[1])
    ids = torch.rand(batch, length).argsort(dim=1)[:, :keep]
    return torch.zeros(batch, length).scatter_(1, ids, 1.0)


# ------------------------------------------------------------------ precondition

PRECOND_SHAPES = [(2, 4, 32, 32), (5, 3, 6, 10), (1, 1, 1, 1), (2, 4, 48, 48)]


def check_precondition(shape, dtype, sigma: torch.Tensor, sigma_min: float | None) -> None:
    x0 = torch.randn(shape).to(dtype)
    noise = torch.randn(shape).to(dtype)
    n_out = 3 if sigma_min is None else 4
    upstream = [torch.randn(shape).to(dtype) for _ in range(n_out)]
    upstream[2] = torch.randn(shape[0])  # c_noise is fp32

    def fused(a, b, s):
        return EDMPreconditionFunction.apply(a, b, s, 0.5, sigma_min)

    def ref(a, b, s):
        return edm_precondition_ref(a, b, s, sigma_min, 0.5)

    outs, grads = run_with_grads(fused, [x0, noise, sigma], upstream)
    lowp, lowp_grads = run_with_grads(ref, [x0, noise, sigma], upstream)
    truth, truth_grads = run_with_grads(ref, [x0.double(), noise.double(), sigma.double()],
                                        [g.double() for g in upstream])
    assert len(outs) == n_out
    assert outs[0].dtype == dtype and outs[2].dtype == torch.float32
    names = ["x_noisy", "x_in", "c_noise", "x_in_teacher"][:n_out]
    compare(outs, lowp, truth, names)
    compare(grads, lowp_grads, truth_grads, ["dx0", "dnoise", "dsigma"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", PRECOND_SHAPES, ids=str)
def test_precondition_matches_reference(shape, dtype) -> None:
    check_precondition(shape, dtype, edm_sigma(shape[0]), SIGMA_MIN)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_precondition_without_teacher_and_extreme_sigma(dtype) -> None:
    check_precondition((2, 4, 32, 32), dtype, torch.tensor([0.002, 80.0]), None)


def test_precondition_teacher_equals_separate_pass() -> None:
    x0, noise = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    teacher = EDMPreconditionFunction.apply(x0, noise, edm_sigma(2), 0.5, SIGMA_MIN)[3]
    separate = EDMPreconditionFunction.apply(x0, noise, torch.full((2,), SIGMA_MIN), 0.5, None)[1]
    torch.testing.assert_close(teacher, separate, rtol=1e-6, atol=1e-7)


def test_precondition_partial_use_stride0_grads_and_noncontiguous_inputs() -> None:
    base = torch.randn(3, 16, 12, 4)
    x0 = base.permute(0, 3, 1, 2)  # [3, 4, 16, 12], not contiguous
    noise = torch.randn(3, 4, 16, 24)[..., ::2]
    sigma = edm_sigma(6)[::2]
    assert not x0.is_contiguous() and not noise.is_contiguous() and not sigma.is_contiguous()
    grads = []
    for fn in (edm_precondition, edm_precondition_ref):
        a, b, s = leaves(x0, noise, sigma)
        out = fn(a, b, s, SIGMA_MIN)
        (out[1].sum() + out[3].sum()).backward()  # x_noisy and c_noise unused: None grads
        grads.append([a.grad, b.grad, s.grad])
    for got, want, name in zip(*grads, ["dx0", "dnoise", "dsigma"], strict=True):
        assert_close_fp32(got, want, name)


def test_precondition_grads_only_to_noise_and_c_noise_only() -> None:
    x0, noise, sigma = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), edm_sigma(2)
    b, = leaves(noise)
    edm_precondition(x0, b, sigma)[0].sum().backward()
    assert_close_fp32(b.grad, sigma.view(2, 1, 1, 1).expand_as(noise), "dnoise")
    s, = leaves(sigma)
    edm_precondition(x0, noise, s)[2].sum().backward()
    assert_close_fp32(s.grad, 0.25 / sigma, "dsigma from c_noise")


# ------------------------------------------------------------------ loss

LOSS_CASES = [  # (shape, patch_size, weight kind)
    ((2, 4, 32, 32), None, None),
    ((5, 3, 6, 10), None, None),
    ((1, 1, 1, 1), None, None),
    ((2, 4, 48, 48), None, None),
    ((2, 4, 32, 32), 2, "keep:1"),
    ((2, 4, 32, 32), 2, "keep:255"),
    ((2, 4, 32, 32), 2, "keep:256"),
    ((2, 4, 32, 32), 2, "random"),
    ((3, 3, 6, 10), 2, "random"),
    ((2, 2, 6, 9), 3, "keep:5"),
    ((2, 4, 48, 48), 4, "keep:100"),
]


def loss_inputs(shape, dtype, sigma: torch.Tensor):
    """F, x_noisy = x0 + sigma*noise (so D - x0 cancels at small sigma, the hard case), x0."""
    x0 = torch.randn(shape)
    x_noisy = x0 + sigma.view(-1, *[1] * (len(shape) - 1)) * torch.randn(shape)
    return torch.randn(shape).to(dtype), x_noisy.to(dtype), x0.to(dtype)


def check_loss(shape, dtype, sigma, patch_size, weight) -> None:
    F, x_noisy, x0 = loss_inputs(shape, dtype, sigma)
    upstream = [torch.randn(shape[0])]

    def fused(f, xn, x, s):
        return EDMLossFunction.apply(f, xn, x, s, weight, patch_size or 0, 0.5)

    def ref(f, xn, x, s):
        return edm_loss_ref(f, xn, x, s, 0.5, weight, patch_size)

    (loss,), grads = run_with_grads(fused, [F, x_noisy, x0, sigma], upstream)
    lowp, lowp_grads = run_with_grads(ref, [F, x_noisy, x0, sigma], upstream)
    truth, truth_grads = run_with_grads(ref, [t.double() for t in (F, x_noisy, x0, sigma)],
                                        [upstream[0].double()])
    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
    compare([loss], lowp, truth, ["loss"])
    compare(grads, lowp_grads, truth_grads, ["dF", "dx_noisy", "dx0", "dsigma"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: f"{c[0]}-p{c[1]}-{c[2]}")
def test_loss_matches_reference(case, dtype) -> None:
    shape, patch_size, kind = case
    weight = None
    if patch_size is not None:
        length = (shape[2] // patch_size) * (shape[3] // patch_size)
        weight = patch_weights(shape[0], length, kind)
    check_loss(shape, dtype, edm_sigma(shape[0]), patch_size, weight)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_loss_extreme_sigma(dtype) -> None:
    sigma = torch.tensor([0.002, 80.0])
    check_loss((2, 4, 32, 32), dtype, sigma, None, None)
    check_loss((2, 4, 32, 32), dtype, sigma, 2, patch_weights(2, 256, "keep:205"))


def test_loss_zero_weight_row_gives_zero_loss_and_grads() -> None:
    F, x_noisy, x0 = loss_inputs((2, 4, 8, 8), torch.float32, edm_sigma(2))
    weight = patch_weights(2, 16, "random")
    weight[1] = 0.0
    f, xn, x, s = leaves(F, x_noisy, x0, edm_sigma(2))
    loss = edm_loss(f, xn, x, s, patch_weight=weight, patch_size=2)
    loss.sum().backward()
    assert loss[1].item() == 0.0 and loss[0].item() > 0
    for t in (f, xn, x, s):
        assert torch.isfinite(t.grad).all() and (t.grad[1] == 0).all()
    assert_close_fp32(loss, edm_loss_ref(F, x_noisy, x0, s.detach(), 0.5, weight, 2), "loss")


def test_loss_stride0_grads_and_noncontiguous_inputs() -> None:
    F = torch.randn(2, 32, 32, 4).permute(0, 3, 1, 2)
    x_noisy = torch.randn(2, 4, 32, 64)[..., ::2]
    x0 = torch.randn(2, 4, 32, 32).transpose(2, 3)
    weight = patch_weights(256, 2, "random").t()  # [2, 256], not contiguous
    sigma = edm_sigma(2)
    assert not any(t.is_contiguous() for t in (F, x_noisy, x0, weight))
    results = []
    for fn in (edm_loss, edm_loss_ref):
        xs = leaves(F, x_noisy, x0, sigma)
        loss = fn(*xs, 0.5, weight, 2)
        loss.sum().backward()  # the backward sees a stride-0 [B] grad
        results.append([loss, *(x.grad for x in xs)])
    for got, want, name in zip(*results, ["loss", "dF", "dx_noisy", "dx0", "dsigma"], strict=True):
        assert_close_fp32(got.detach(), want.detach(), name)


def test_backward_is_deterministic() -> None:
    shape = (2, 4, 48, 48)  # two chunks per sample under the interpreter
    F, x_noisy, x0 = loss_inputs(shape, torch.bfloat16, edm_sigma(2))
    sigma, weight, g = edm_sigma(2), patch_weights(2, 576, "random"), torch.randn(2)
    noise, gp = torch.randn(shape), [torch.randn(shape), torch.randn(shape), torch.randn(2)]
    runs = []
    for _ in range(2):
        xs = leaves(F, x_noisy, x0, sigma)
        loss = EDMLossFunction.apply(*xs, weight, 2, 0.5)
        loss.backward(g)
        ps = leaves(x0.float(), noise, sigma)
        outs = EDMPreconditionFunction.apply(*ps, 0.5, None)
        torch.autograd.backward(outs, gp)
        runs.append([loss, *(x.grad for x in xs), *outs, *(p.grad for p in ps)])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ dispatch, compile, errors


def test_reference_backend_is_the_reference() -> None:
    x0, noise, sigma = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), edm_sigma(2)
    weight = patch_weights(2, 16, "keep:12")
    with _runtime.force_backend("reference"):
        pre = edm_precondition(x0, noise, sigma, SIGMA_MIN)
        loss = edm_loss(pre[1], pre[0], x0, sigma.requires_grad_(), patch_weight=weight,
                        patch_size=2)
    assert "EDMLoss" not in type(loss.grad_fn).__name__
    for got, want in zip(pre, edm_precondition_ref(x0, noise, sigma, SIGMA_MIN), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(loss, edm_loss_ref(pre[1], pre[0], x0, sigma, 0.5, weight, 2))
    assert "EDMLoss" in type(edm_loss(pre[1], pre[0], x0, sigma).grad_fn).__name__


def test_no_grad_path_matches_autograd_function() -> None:
    x0, noise, sigma = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), edm_sigma(2)
    F, weight = torch.randn(2, 4, 8, 8), patch_weights(2, 16, "random")
    with torch.no_grad():
        pre = edm_precondition(x0, noise, sigma, SIGMA_MIN)
        loss = edm_loss(F, pre[0], x0, sigma, patch_weight=weight, patch_size=2)
    assert isinstance(pre, tuple) and not any(t.requires_grad for t in (*pre, loss))
    with_grad = EDMPreconditionFunction.apply(*leaves(x0, noise, sigma), 0.5, SIGMA_MIN)
    for got, want in zip(pre, with_grad, strict=True):
        assert torch.equal(got, want.detach())
    want = EDMLossFunction.apply(*leaves(F, pre[0], x0, sigma), weight, 2, 0.5)
    assert torch.equal(loss, want.detach())


def test_torch_compile_fullgraph_matches_eager() -> None:
    def step(x0, noise, sigma, scale, weight):
        x_noisy, x_in, c_noise, x_teacher = edm_precondition(x0, noise, sigma, SIGMA_MIN)
        F = x_in * scale + c_noise.view(-1, 1, 1, 1) + 0.1 * x_teacher
        kept = edm_loss(F, x_noisy, x0, sigma, patch_weight=weight, patch_size=2)
        return (kept + edm_loss(F, x_noisy, x0, sigma)).sum()

    x0, noise, sigma = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), edm_sigma(2)
    weight, scale = patch_weights(2, 16, "keep:12"), torch.randn(4, 1, 1)
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        xs = leaves(x0, noise, sigma, scale)
        out = fn(*xs, weight)
        out.backward()
        results.append([out.detach(), *(x.grad for x in xs)])
    for got, want, name in zip(*results, ["loss", "dx0", "dnoise", "dsigma", "dscale"],
                               strict=True):
        assert_close_fp32(got, want, name)


def _bad_precondition_calls():
    x, s = torch.randn(2, 3, 4, 4), torch.rand(2) + 0.1
    return [
        (lambda: edm_precondition(x, x, torch.rand(3) + 0.1), ValueError, "sigma"),
        (lambda: edm_precondition(x, x, torch.rand(2, 1) + 0.1), ValueError, "sigma"),
        (lambda: edm_precondition(x, x, torch.tensor([0.5, 0.0])), ValueError, "sigma"),
        (lambda: edm_precondition(x, x, torch.tensor([0.5, float("nan")])), ValueError, "sigma"),
        (lambda: edm_precondition(x, x, torch.tensor([1, 2])), TypeError, "sigma"),
        (lambda: edm_precondition(x, x[:, :2], s), ValueError, "noise"),
        (lambda: edm_precondition(x.int(), x.int(), s), TypeError, "x0"),
        (lambda: edm_precondition(x, x.half(), s), TypeError, "noise"),
        (lambda: edm_precondition(x, x, s, sigma_min=-1.0), ValueError, "sigma_min"),
        (lambda: edm_precondition(x, x, s, sigma_data=0.0), ValueError, "sigma_data"),
        (lambda: edm_precondition(x, x.to("meta"), s), ValueError, "noise on meta"),
        (lambda: edm_precondition(x[:0], x[:0], s[:0]), ValueError, "x0"),
    ]


def _bad_loss_calls():
    x, s = torch.randn(2, 3, 4, 4), torch.rand(2) + 0.1
    w = torch.ones(2, 4)
    return [
        (lambda: edm_loss(x, x, x[:, :2], s), ValueError, "x0"),
        (lambda: edm_loss(x, x[:1], x, s), ValueError, "x_noisy"),
        (lambda: edm_loss(x.long(), x.long(), x.long(), s), TypeError, "F"),
        (lambda: edm_loss(x, x, x, s[:1]), ValueError, "sigma"),
        (lambda: edm_loss(x, x, x, -s), ValueError, "sigma"),
        (lambda: edm_loss(x, x, x, s, patch_weight=w), ValueError, "patch_size"),
        (lambda: edm_loss(x, x, x, s, patch_size=2), ValueError, "patch_weight"),
        (lambda: edm_loss(x, x, x, s, patch_weight=w, patch_size=3), ValueError, "patch_size"),
        (lambda: edm_loss(x, x, x, s, patch_weight=torch.ones(2, 5), patch_size=2), ValueError,
         "patch_weight"),
        (lambda: edm_loss(x, x, x, s, patch_weight=torch.ones(2, 4, dtype=torch.long),
                          patch_size=2), TypeError, "patch_weight"),
        (lambda: edm_loss(x, x, x, s, patch_weight=-w, patch_size=2), ValueError, "patch_weight"),
        (lambda: edm_loss(x, x, x, s, patch_weight=w.requires_grad_(), patch_size=2), ValueError,
         "patch_weight"),
        (lambda: edm_loss(x[0], x[0], x[0], torch.rand(3) + 0.1, patch_weight=torch.ones(3, 4),
                          patch_size=2), ValueError, "F"),
        (lambda: edm_loss(x, x, x, s, patch_weight=w.to("meta"), patch_size=2), ValueError,
         "patch_weight on meta"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_precondition_calls())))
def test_precondition_rejects_bad_input(index) -> None:
    call, error, needle = _bad_precondition_calls()[index]
    with pytest.raises(error, match=needle):
        call()


@pytest.mark.parametrize("index", range(len(_bad_loss_calls())))
def test_loss_rejects_bad_input(index) -> None:
    call, error, needle = _bad_loss_calls()[index]
    with pytest.raises(error, match=needle):
        call()


@pytest.mark.filterwarnings("ignore:invalid value encountered in log")
def test_check_false_skips_value_checks() -> None:
    x = torch.randn(2, 3, 4, 4)
    out = edm_precondition(x, x, torch.tensor([0.5, -1.0]), check=False)
    assert torch.isnan(out[2][1])  # ln of a negative sigma: the caller opted out


# ------------------------------------------------------------------ GPU, full size


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_full_size(dtype) -> None:
    torch.set_default_device("cuda")
    try:
        shape = (32, 4, 32, 32)
        check_precondition(shape, dtype, edm_sigma(32), SIGMA_MIN)
        check_loss(shape, dtype, edm_sigma(32), None, None)
        for kind in ("keep:205", "keep:128", "random"):
            check_loss(shape, dtype, edm_sigma(32), 2, patch_weights(32, 256, kind))
        pixels = (4, 3, 64, 64)  # several chunks per sample in the reductions
        check_precondition(pixels, dtype, edm_sigma(4), SIGMA_MIN)
        check_loss(pixels, dtype, edm_sigma(4), 4, patch_weights(4, 256, "keep:64"))
    finally:
        torch.set_default_device(None)
