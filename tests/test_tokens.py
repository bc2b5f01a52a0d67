"""Masked token gather/scatter: Triton kernels against the pure-torch reference.

Outputs and copy-gradients must match exactly; the sums (pos grad, [D]-fill grad) match
within the dtype tolerances of tests/numerics.py and are bitwise reproducible.
"""

from __future__ import annotations

import pytest
import torch
from numerics import assert_matches

from sdkernels import _runtime
from sdkernels.tokens import (
    GatherTokensFunction,
    ScatterTokensFunction,
    gather_tokens,
    gather_tokens_ref,
    scatter_tokens,
    scatter_tokens_ref,
)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
I32, I64 = torch.int32, torch.int64


def random_ids(B: int, L: int, K: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """A random (unsorted) keep set per row."""
    return torch.stack([torch.randperm(L)[:K] for _ in range(B)]).to(dtype).to(device)


def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert torch.equal(actual, expected), f"{name}: differs ({(actual != expected).sum()} elements)"


def assert_all_match(got, expected, names) -> None:
    """Outputs and grads from the kernels against the reference, fp32 tolerance or dtype's."""
    for name, a, e in zip(names, got, expected, strict=True):
        if e is None:
            assert a is None, f"{name}: expected no grad"
        elif e.numel() == 0:
            assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
        else:
            assert_matches(a.detach(), e.detach(), e.detach(), name)


def assert_rounded_sum(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """One fp32 add rounded to the dtype. The Triton interpreter truncates fp32 -> bf16
    (a GPU rounds to nearest even), so there allow one ulp; everything else is exact."""
    if actual.dtype == BF16 and _runtime.interpreter_active():
        ulp = torch.finfo(BF16).eps * expected.float().abs()
        assert ((actual.float() - expected.float()).abs() <= ulp).all(), f"{name}: > 1 ulp off"
    else:
        assert_exact(actual, expected, name)


# ------------------------------------------------------------------------------ gather

# (B, L, K, D, dtype, ids dtype, pos: None | "fixed" | "learned")
GATHER_CASES = [
    (1, 1, 1, 64, F32, I64, None),
    (3, 1, 1, 1152, BF16, I64, "fixed"),
    (3, 5, 4, 72, F32, I32, "learned"),
    (3, 5, 5, 64, F16, I64, "fixed"),
    (1, 5, 1, 1152, BF16, I32, "learned"),
    (3, 5, 4, 72, BF16, I64, "learned"),
    (3, 256, 255, 72, BF16, I64, None),
    (3, 256, 256, 64, F32, I32, "learned"),
    (1, 256, 1, 1152, F16, I32, "learned"),
    (3, 256, 205, 1152, BF16, I32, "fixed"),
    (3, 256, 128, 64, F16, I64, None),
]


def run_gather(fn, x, ids, pos, grad, x_grad=True):
    x = leaf(x, x_grad)
    pos = None if pos is None else leaf(pos[0], pos[1])
    out = fn(x, ids, pos)
    out.backward(grad)
    return out, x.grad, None if pos is None else pos.grad


@pytest.mark.parametrize("B,L,K,D,dtype,idtype,pos_mode", GATHER_CASES)
def test_gather_matches_reference(B, L, K, D, dtype, idtype, pos_mode):
    x = torch.randn(B, L, D, dtype=dtype)
    ids = random_ids(B, L, K, idtype)
    pos = None if pos_mode is None else (torch.randn(L, D, dtype=dtype), pos_mode == "learned")
    grad = torch.randn(B, K, D, dtype=dtype)
    with _runtime.poison_outputs():
        out, dx, dpos = run_gather(GatherTokensFunction.apply, x, ids, pos, grad)
    ref, ref_dx, ref_dpos = run_gather(gather_tokens_ref, x, ids, pos, grad)
    if pos is None:
        assert_exact(out, ref, "out")
    else:
        assert_rounded_sum(out, ref, "out")
    assert_exact(dx, ref_dx, "dx")
    if pos_mode == "learned":
        pos32 = (pos[0].float(), True)
        *_, truth = run_gather(gather_tokens_ref, x.float(), ids, pos32, grad.float())
        assert_matches(dpos, ref_dpos, truth, "dpos")
    else:
        assert dpos is None


def test_gather_pos_grad_without_x_grad():
    B, L, K, D = 3, 5, 3, 64
    x, pos = torch.randn(B, L, D), torch.randn(L, D)
    ids = random_ids(B, L, K, I64)
    grad = torch.randn(B, K, D)
    with _runtime.poison_outputs():
        _, dx, dpos = run_gather(GatherTokensFunction.apply, x, ids, (pos, True), grad, False)
    _, _, ref_dpos = run_gather(gather_tokens_ref, x, ids, (pos, True), grad, False)
    assert dx is None
    assert_matches(dpos, ref_dpos, ref_dpos, "dpos")


# ------------------------------------------------------------------------------ scatter

# (B, L, K, D, dtype, ids dtype, fill kind)
SCATTER_CASES = [
    (1, 1, 1, 64, F32, I32, "full"),
    (1, 1, 1, 72, BF16, I64, "vector"),
    (3, 5, 4, 72, F32, I64, "vector"),
    (3, 5, 5, 64, F16, I32, "full"),
    (3, 5, 1, 1152, BF16, I32, "full"),
    (3, 5, 4, 64, F16, I32, "vector"),
    (3, 256, 255, 64, F16, I64, "vector"),
    (1, 256, 256, 72, BF16, I32, "vector"),
    (3, 256, 1, 72, F32, I32, "full"),
    (3, 256, 205, 1152, BF16, I64, "full"),
    (3, 256, 128, 1152, BF16, I32, "vector"),
]


def make_fill(kind: str, B: int, L: int, D: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(B, L, D, dtype=dtype) if kind == "full" else torch.randn(D, dtype=dtype)


def run_scatter(fn, x_keep, ids, fill, L, grad, keep_grad=True, fill_grad=True):
    x_keep, fill = leaf(x_keep, keep_grad), leaf(fill, fill_grad)
    out = fn(x_keep, ids, fill, L)
    out.backward(grad)
    return out, x_keep.grad, fill.grad


@pytest.mark.parametrize("B,L,K,D,dtype,idtype,kind", SCATTER_CASES)
def test_scatter_matches_reference(B, L, K, D, dtype, idtype, kind):
    x_keep = torch.randn(B, K, D, dtype=dtype)
    ids = random_ids(B, L, K, idtype)
    fill = make_fill(kind, B, L, D, dtype)
    grad = torch.randn(B, L, D, dtype=dtype)
    with _runtime.poison_outputs():
        out, dkeep, dfill = run_scatter(ScatterTokensFunction.apply, x_keep, ids, fill, L, grad)
    ref, ref_dkeep, ref_dfill = run_scatter(scatter_tokens_ref, x_keep, ids, fill, L, grad)
    assert_exact(out, ref, "out")
    assert_exact(dkeep, ref_dkeep, "dx_keep")
    if kind == "full":
        assert_exact(dfill, ref_dfill, "dfill")
    else:
        *_, truth = run_scatter(scatter_tokens_ref, x_keep.float(), ids, fill.float(), L,
                                grad.float())
        assert_matches(dfill, ref_dfill, truth, "dfill")


@pytest.mark.parametrize("kind", ["full", "vector"])
@pytest.mark.parametrize("keep_grad,fill_grad", [(True, False), (False, True)])
def test_scatter_partial_grads(kind, keep_grad, fill_grad):
    B, L, K, D = 3, 5, 3, 72
    x_keep, ids = torch.randn(B, K, D), random_ids(B, L, K, I32)
    fill, grad = make_fill(kind, B, L, D, F32), torch.randn(B, L, D)
    with _runtime.poison_outputs():
        got = run_scatter(ScatterTokensFunction.apply, x_keep, ids, fill, L, grad,
                          keep_grad, fill_grad)
    ref = run_scatter(scatter_tokens_ref, x_keep, ids, fill, L, grad, keep_grad, fill_grad)
    assert_all_match(got, ref, ("out", "dx_keep", "dfill"))


def test_scatter_keeps_nothing():
    B, L, D = 2, 5, 64
    x_keep, ids = torch.randn(B, 0, D), torch.zeros(B, 0, dtype=I64)
    fill, grad = torch.randn(D), torch.randn(B, L, D)
    with _runtime.poison_outputs():
        got = run_scatter(ScatterTokensFunction.apply, x_keep, ids, fill, L, grad)
    ref = run_scatter(scatter_tokens_ref, x_keep, ids, fill, L, grad)
    assert_all_match(got, ref, ("out", "dx_keep", "dfill"))


# ------------------------------------------------------------------------------ both


def test_sum_backward_and_noncontiguous_inputs():
    """`.sum().backward()` hands the backward a stride-0 grad; inputs are strided views."""
    B, L, K, D = 3, 5, 4, 72
    x = torch.randn(B, D, L).transpose(1, 2)  # [B, L, D], not contiguous
    pos = torch.randn(D, L).t()  # [L, D]
    ids = random_ids(B, L, K, I32).t().contiguous().t()  # [B, K], not contiguous
    assert not x.is_contiguous() and not pos.is_contiguous() and not ids.is_contiguous()
    fill = torch.randn(B, D, L).transpose(1, 2)
    x_keep = torch.randn(B, D, K).transpose(1, 2)

    def gather_sum(fn):
        xl, pl = leaf(x), leaf(pos)
        fn(xl, ids, pl).sum().backward()
        return xl.grad, pl.grad

    def scatter_sum(fn, f):
        kl, fl = leaf(x_keep), leaf(f)
        fn(kl, ids, fl, L).sum().backward()
        return kl.grad, fl.grad

    with _runtime.poison_outputs():
        got = gather_sum(GatherTokensFunction.apply)
        got += scatter_sum(ScatterTokensFunction.apply, fill)
        got += scatter_sum(ScatterTokensFunction.apply, fill[0, 0])  # strided [D] fill
    ref = gather_sum(gather_tokens_ref) + scatter_sum(scatter_tokens_ref, fill)
    ref += scatter_sum(scatter_tokens_ref, fill[0, 0])
    assert_all_match(got, ref, ("dx", "dpos", "dkeep", "dfill", "dkeep1", "dfill1"))

    with _runtime.poison_outputs():  # a non-contiguous incoming grad
        g = torch.randn(B, D, L).transpose(1, 2)
        got = run_scatter(ScatterTokensFunction.apply, x_keep, ids, fill, L, g)
    ref = run_scatter(scatter_tokens_ref, x_keep, ids, fill, L, g)
    for name, a, e in zip(("out", "dkeep", "dfill"), got, ref, strict=True):
        assert_exact(a.detach(), e.detach(), name)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_round_trip(dtype):
    B, L, K, D = 3, 256, 205, 72
    x = torch.randn(B, L, D, dtype=dtype)
    ids = random_ids(B, L, K, I64)
    with _runtime.poison_outputs():
        back = scatter_tokens(gather_tokens(x, ids, check_ids=False), ids, x, check_ids=False)
    assert_exact(back, x, "round trip")


def test_sums_are_deterministic():
    B, L, K, D = 3, 256, 128, 72
    x_keep, ids, fill = torch.randn(B, K, D), random_ids(B, L, K, I32), torch.randn(D)
    x, pos = torch.randn(B, L, D), torch.randn(L, D)
    g_scatter, g_gather = torch.randn(B, L, D), torch.randn(B, K, D)
    fills = [run_scatter(ScatterTokensFunction.apply, x_keep, ids, fill, L, g_scatter)[2]
             for _ in range(2)]
    poss = [run_gather(GatherTokensFunction.apply, x, ids, (pos, True), g_gather)[2]
            for _ in range(2)]
    assert torch.equal(fills[0], fills[1]) and torch.equal(poss[0], poss[1])


def test_reference_backend_fallback():
    B, L, K, D = 2, 5, 3, 64
    x, ids, fill = (
        torch.randn(B, L, D, requires_grad=True), random_ids(B, L, K, I32), torch.randn(D))
    with _runtime.force_backend("reference"):
        kept = gather_tokens(x, ids)
        out = scatter_tokens(kept, ids, fill, L)
    assert "Function" not in type(kept.grad_fn).__name__  # not the Triton autograd.Function
    assert_exact(out, scatter_tokens_ref(gather_tokens_ref(x, ids), ids, fill, L), "out")
    with _runtime.force_backend("reference"):  # duplicates pass with the check switched off
        scatter_tokens(kept, torch.zeros(B, K, dtype=I32), fill, L, check_ids=False)


def test_public_ops_under_torch_compile():
    """Dynamo traces the public ops (checks, dispatch, autograd.Function, custom ops); the
    graphs hold only our ops, so Inductor has no C++ to build and the test stays quick."""
    B, L, K, D = 2, 5, 3, 64

    def step(x, pos, ids, mask_token, x_keep, fill):
        masked = scatter_tokens(gather_tokens(x, ids, pos), ids, mask_token, L)
        return masked, scatter_tokens(x_keep, ids, fill)

    inputs = [torch.randn(B, L, D), torch.randn(L, D), random_ids(B, L, K, I64), torch.randn(D),
              torch.randn(B, K, D), torch.randn(B, L, D)]
    grads = [torch.randn(B, L, D), torch.randn(B, L, D)]
    leaves = (0, 1, 3, 4, 5)

    def run(fn):
        args = [leaf(t) if i in leaves else t for i, t in enumerate(inputs)]
        outs = fn(*args)
        torch.autograd.backward(outs, grads)
        return [*outs] + [args[i].grad for i in leaves]

    got = run(torch.compile(step, fullgraph=True))
    assert_all_match(got, run(step), ("masked", "out", "dx", "dpos", "dmask", "dkeep", "dfill"))


# ------------------------------------------------------------------------------ validation


def _bad_inputs():
    B, L, K, D = 2, 5, 3, 8
    x, ids = torch.randn(B, L, D), random_ids(B, L, K, I64)
    x_keep, fill = torch.randn(B, K, D), torch.randn(B, L, D)
    g = lambda **kw: lambda: gather_tokens(**{"x": x, "ids_keep": ids, **kw})
    s = lambda **kw: lambda: scatter_tokens(**{"x_keep": x_keep, "ids_keep": ids, "fill": fill,
                                               **kw})
    too_high = ids.clone()
    too_high[1, 2] = L
    dup = ids.clone()
    dup[0, 1] = dup[0, 0]
    meta = torch.empty(L, D, device="meta")
    return {
        "gather x rank": (g(x=x[0]), ValueError, "x must"),
        "gather x int": (g(x=x.long()), TypeError, "x must"),
        "gather ids float": (g(ids_keep=ids.float()), TypeError, "ids_keep"),
        "gather ids rank": (g(ids_keep=ids[0]), ValueError, "ids_keep"),
        "gather ids batch": (g(ids_keep=ids[:1]), ValueError, "ids_keep"),
        "gather ids too high": (g(ids_keep=too_high), ValueError, "ids_keep"),
        "gather ids negative": (g(ids_keep=-1 - ids), ValueError, "ids_keep"),
        "gather ids duplicate": (g(ids_keep=dup), ValueError, "ids_keep.*unique"),
        "gather K > L": (g(ids_keep=random_ids(B, L + 1, L + 1, I64)), ValueError, "ids_keep"),
        "gather pos width": (g(pos=torch.randn(L, D + 1)), ValueError, "pos"),
        "gather pos length": (g(pos=torch.randn(L + 1, D)), ValueError, "pos"),
        "gather pos dtype": (g(pos=torch.randn(L, D, dtype=F16)), TypeError, "pos"),
        "gather pos device": (g(pos=meta), ValueError, "pos on meta"),
        "scatter x_keep rank": (s(x_keep=x_keep[0]), ValueError, "x_keep"),
        "scatter x_keep int": (s(x_keep=x_keep.int()), TypeError, "x_keep"),
        "scatter ids batch": (s(ids_keep=ids[:1]), ValueError, "ids_keep"),
        "scatter ids K": (s(ids_keep=ids[:, :2]), ValueError, "ids_keep"),
        "scatter ids too high": (s(ids_keep=too_high), ValueError, "ids_keep"),
        "scatter ids duplicate": (s(ids_keep=dup), ValueError, "ids_keep"),
        "scatter ids int16": (s(ids_keep=ids.short()), TypeError, "ids_keep"),
        "scatter fill width": (s(fill=torch.randn(B, L, D + 1)), ValueError, "fill"),
        "scatter fill batch": (s(fill=torch.randn(B + 1, L, D)), ValueError, "fill"),
        "scatter fill rank": (s(fill=torch.randn(L, D)), ValueError, "fill"),
        "scatter fill vector width": (s(fill=torch.randn(D + 1), length=L), ValueError, "fill"),
        "scatter fill dtype": (s(fill=fill.half()), TypeError, "fill"),
        "scatter fill int": (s(fill=fill.long()), TypeError, "fill"),
        "scatter fill device": (s(fill=torch.empty(D, device="meta"), length=L), ValueError,
                                "fill on meta"),
        "scatter length missing": (s(fill=torch.randn(D)), ValueError, "length"),
        "scatter length mismatch": (s(length=L + 1), ValueError, "length"),
        "scatter length float": (s(fill=torch.randn(D), length=float(L)), TypeError, "length"),
        "scatter length vs ids": (s(fill=torch.randn(D), length=2), ValueError, "ids_keep"),
        "scatter ids out of length": (s(fill=torch.randn(D), length=K, ids_keep=torch.tensor(
                                      [[0, 1, K], [2, 1, 0]])),
                                      ValueError, "ids_keep"),
    }


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_rejected(case):
    call, error, match = BAD_INPUTS[case]
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("K", [205, 128])
def test_full_size_on_cuda(K):
    B, L, D, dev = 32, 256, 1152, "cuda"
    x, pos = torch.randn(B, L, D, dtype=BF16, device=dev), torch.randn(L, D, dtype=BF16, device=dev)
    ids = random_ids(B, L, K, I64, dev)
    g = torch.randn(B, K, D, dtype=BF16, device=dev)
    for p in (None, (pos, False), (pos, True)):
        got = run_gather(GatherTokensFunction.apply, x, ids, p, g)
        ref = run_gather(gather_tokens_ref, x, ids, p, g)
        assert_exact(got[0], ref[0], "out")
        assert_exact(got[1], ref[1], "dx")
        if p is not None and p[1]:
            truth = run_gather(gather_tokens_ref, x.float(), ids, (pos.float(), True), g.float())
            assert_matches(got[2], ref[2], truth[2], "dpos")
            again = run_gather(GatherTokensFunction.apply, x, ids, p, g)[2]
            assert torch.equal(got[2], again), "dpos not deterministic"
    x_keep, gs = torch.randn(B, K, D, dtype=BF16, device=dev), torch.randn_like(x)
    for fill in (x, torch.randn(D, dtype=BF16, device=dev)):
        got = run_scatter(ScatterTokensFunction.apply, x_keep, ids.int(), fill, L, gs)
        ref = run_scatter(scatter_tokens_ref, x_keep, ids, fill, L, gs)
        assert_exact(got[0], ref[0], "out")
        assert_exact(got[1], ref[1], "dx_keep")
        if fill.dim() == 3:
            assert_exact(got[2], ref[2], "dfill")
        else:
            truth = run_scatter(scatter_tokens_ref, x_keep.float(), ids, fill.float(), L,
                                gs.float())
            assert_matches(got[2], ref[2], truth[2], "dfill")
            again = run_scatter(ScatterTokensFunction.apply, x_keep, ids, fill, L, gs)[2]
            assert torch.equal(got[2], again), "dfill not deterministic"
