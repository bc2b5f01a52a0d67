"""Fused adaLN kernels against their pure-torch references: outputs and every gradient.

On CPU the kernels run through the Triton interpreter (conftest sets TRITON_INTERPRET=1);
with CUDA the same tests run on the GPU. Low-precision results are judged against the
reference in fp32 on the same rounded inputs, allowing twice the error of the reference
run in the low dtype. (The interpreter truncates fp32 -> bf16 where a GPU rounds to
nearest even, so bf16 kernel errors on CPU are up to one ulp rather than half.)
"""

from collections.abc import Callable, Sequence

import pytest
import torch
from numerics import assert_close_fp32, assert_matches

from sdkernels import _runtime
from sdkernels.adaln import (
    MAX_FUSED_D,
    AdaLNModulateFunction,
    ResidualGateAdaLNFunction,
    adaln_modulate,
    adaln_modulate_ref,
    residual_gate_adaln,
    residual_gate_adaln_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODULATE_NAMES = ["y", "dx", "dshift", "dscale"]
RESIDUAL_NAMES = ["x_out", "h", "dx", "dy", "dgate", "dshift", "dscale"]


def fused_modulate(x, shift, scale):
    return AdaLNModulateFunction.apply(x, shift, scale, EPS)


def fused_residual(x, y, gate, shift, scale):
    return ResidualGateAdaLNFunction.apply(x, y, gate, shift, scale, EPS)


def modulate_inputs(B: int, T: int, D: int, device: str = DEVICE) -> list[torch.Tensor]:
    x = torch.randn(B, T, D, device=device) * 2 + 0.5  # [B, T, D], off-centre rows
    shift = torch.randn(B, D, device=device)
    scale = 0.5 * torch.randn(B, D, device=device)
    return [x, shift, scale]


def residual_inputs(B: int, T: int, D: int, device: str = DEVICE) -> list[torch.Tensor]:
    x, shift, scale = modulate_inputs(B, T, D, device)
    y = torch.randn(B, T, D, device=device)
    gate = torch.randn(B, D, device=device)
    return [x, y, gate, shift, scale]


def run(fn: Callable, inputs: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Outputs of fn, then the grad of every input; a None grad leaves that output unused."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    used = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None]
    torch.autograd.backward([o for o, _ in used], [g for _, g in used])
    input_grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return [o.detach() for o in outs] + input_grads


def check_against_reference(fused: Callable, ref: Callable, inputs: list[torch.Tensor],
                            grads: list[torch.Tensor | None], names: list[str]) -> None:
    with _runtime.poison_outputs():
        actual = run(fused, inputs, grads)
    torch_lowp = run(ref, inputs, grads)
    truth = run(ref, [t.float() for t in inputs],
                [None if g is None else g.float() for g in grads])
    for a, lowp, t, name in zip(actual, torch_lowp, truth, names, strict=True):
        assert a.dtype == lowp.dtype, f"{name}: dtype {a.dtype}, the reference gives {lowp.dtype}"
        assert_matches(a, lowp, t, name)


def shape_grid() -> list[tuple[int, int, int, torch.dtype]]:
    """(B, T, D, dtype): every shape in bf16 (the training dtype); fp32 and fp16 see every
    T and D with B alternating, to keep the interpreter run short."""
    grid = []
    for k, D in enumerate((72, 384, 1152)):
        for i, T in enumerate((1, 7, 63, 256)):
            grid += [(B, T, D, torch.bfloat16) for B in (1, 3)]
            grid += [((1, 3)[(i + j + k) % 2], T, D, dt)
                     for j, dt in enumerate((torch.float32, torch.float16))]
    return grid


SHAPES = pytest.mark.parametrize("B, T, D, dtype", shape_grid(),
                                 ids=lambda v: str(v).replace("torch.", ""))


@SHAPES
def test_modulate_matches_reference(B: int, T: int, D: int, dtype: torch.dtype) -> None:
    inputs = [t.to(dtype) for t in modulate_inputs(B, T, D)]
    dout = torch.randn(B, T, D, device=DEVICE).to(dtype)
    check_against_reference(fused_modulate, adaln_modulate_ref, inputs, [dout], MODULATE_NAMES)


@SHAPES
def test_residual_gate_matches_reference(B: int, T: int, D: int, dtype: torch.dtype) -> None:
    inputs = [t.to(dtype) for t in residual_inputs(B, T, D)]
    grads = [torch.randn(B, T, D, device=DEVICE).to(dtype) for _ in range(2)]
    check_against_reference(fused_residual, residual_gate_adaln_ref, inputs, grads,
                            RESIDUAL_NAMES)


MIXED = pytest.mark.parametrize(
    "B, T, D, dtype",
    [(3, 7, 72, torch.bfloat16), (1, 63, 1152, torch.bfloat16), (3, 1, 384, torch.float16),
     (2, 256, 72, torch.bfloat16), (1, 7, 1152, torch.float16)],
    ids=lambda v: str(v).replace("torch.", ""))


def mixed(inputs: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The bf16-autocast training layout: x (the residual stream) fp32, the rest `dtype`."""
    return [inputs[0].float()] + [t.to(dtype) for t in inputs[1:]]


@MIXED
def test_modulate_mixed_dtypes_match_reference(B: int, T: int, D: int,
                                               dtype: torch.dtype) -> None:
    inputs = mixed(modulate_inputs(B, T, D), dtype)
    dout = torch.randn(B, T, D, device=DEVICE).to(dtype)  # grad of the compute-dtype output
    check_against_reference(fused_modulate, adaln_modulate_ref, inputs, [dout], MODULATE_NAMES)


@MIXED
def test_residual_gate_mixed_dtypes_match_reference(B: int, T: int, D: int,
                                                    dtype: torch.dtype) -> None:
    inputs = mixed(residual_inputs(B, T, D), dtype)
    grads = [torch.randn(B, T, D, device=DEVICE), torch.randn(B, T, D, device=DEVICE).to(dtype)]
    check_against_reference(fused_residual, residual_gate_adaln_ref, inputs, grads,
                            RESIDUAL_NAMES)


def test_mixed_dtype_contract() -> None:
    """x_out and dx keep the residual stream's fp32; h and every other grad the compute
    dtype, in the reference and the fused op alike."""
    inputs = mixed(residual_inputs(2, 7, 72), torch.bfloat16)
    grads = [torch.randn(2, 7, 72, device=DEVICE), torch.randn(2, 7, 72).bfloat16()]
    expected = [torch.float32, torch.bfloat16, torch.float32] + [torch.bfloat16] * 4
    for fn in (fused_residual, residual_gate_adaln_ref, residual_gate_adaln):
        got = [t.dtype for t in run(fn, inputs, grads)]
        assert got == expected, f"{getattr(fn, '__name__', fn)}: {got}"
    got = [t.dtype for t in run(fused_modulate, [inputs[0], *inputs[3:]], grads[1:])]
    assert got == [torch.bfloat16, torch.float32, torch.bfloat16, torch.bfloat16]


@pytest.mark.parametrize("used", ["h_only", "x_out_only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_residual_gate_with_one_output_unused(used: str, dtype: torch.dtype) -> None:
    B, T, D = 3, 63, 384
    inputs = [t.to(dtype) for t in residual_inputs(B, T, D)]
    grad = torch.randn(B, T, D, device=DEVICE).to(dtype)
    grads = [None, grad] if used == "h_only" else [grad, None]
    check_against_reference(fused_residual, residual_gate_adaln_ref, inputs, grads,
                            RESIDUAL_NAMES)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_residual_h_is_modulate_of_returned_x_out(dtype: torch.dtype) -> None:
    """The documented choice: LN statistics come from x_out rounded to the storage dtype."""
    x, y, gate, shift, scale = (t.to(dtype) for t in residual_inputs(3, 63, 384))
    x_out, h = fused_residual(x, y, gate, shift, scale)
    direct = fused_modulate(x_out, shift, scale)
    if DEVICE == "cpu":  # same arithmetic in the same order: bitwise equal
        assert torch.equal(h, direct)
    else:  # a GPU compiler may contract the two kernels differently: one ulp
        ulp = torch.finfo(dtype).eps * float(direct.abs().max())
        assert float((h.float() - direct.float()).abs().max()) <= ulp


def test_strided_inputs_and_stride_zero_grads() -> None:
    """Non-contiguous inputs, and `.sum().backward()`, whose grad is an expanded scalar."""
    B, T, D = 3, 63, 72
    x = (torch.randn(B, D, T, device=DEVICE) + 1).transpose(1, 2)  # [B, T, D], stride T
    y = torch.randn(B, T, 2 * D, device=DEVICE)[:, :, ::2]  # [B, T, D], feature stride 2
    gate, shift, scale = (torch.randn(D, B, device=DEVICE).t() for _ in range(3))  # [B, D]
    for fused, ref, inputs in ((fused_modulate, adaln_modulate_ref, [x, shift, scale]),
                               (fused_residual, residual_gate_adaln_ref,
                                [x, y, gate, shift, scale])):
        def summed(*args, fn=fused):
            outs = fn(*args)
            return sum(o.sum() for o in outs) if isinstance(outs, tuple) else outs.sum()

        def summed_ref(*args, fn=ref):
            outs = fn(*args)
            return sum(o.sum() for o in outs) if isinstance(outs, tuple) else outs.sum()

        with _runtime.poison_outputs():
            actual = run(summed, inputs, [torch.tensor(1.0, device=DEVICE)])
        expected = run(summed_ref, inputs, [torch.tensor(1.0, device=DEVICE)])
        # The summed output is a scalar with cancellation over B*T*D terms: its fp32 error
        # scales with the sum of |terms|, not with the result; gradients compare as usual.
        sum_atol = 1e-6 * sum(o.numel() for o in inputs[:1]) * 4
        torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=sum_atol)
        for i, (a, e) in enumerate(zip(actual[1:], expected[1:], strict=True), start=1):
            assert_close_fp32(a, e, f"{fused.__name__} grad {i}")


def test_token_sums_are_bitwise_deterministic() -> None:
    B, T, D = 2, 256, 72  # several token chunks per sample under the interpreter too
    dtype = torch.bfloat16
    inputs = [t.to(dtype) for t in residual_inputs(B, T, D)]
    grads = [torch.randn(B, T, D, device=DEVICE).to(dtype) for _ in range(2)]
    first = run(fused_residual, inputs, grads)
    second = run(fused_residual, inputs, grads)
    for a, b, name in zip(first, second, RESIDUAL_NAMES, strict=True):
        assert torch.equal(a, b), f"residual_gate_adaln {name} differs between runs"
    dout = torch.randn(B, T, D, device=DEVICE).to(dtype)
    first = run(fused_modulate, inputs[:1] + inputs[3:], [dout])
    second = run(fused_modulate, inputs[:1] + inputs[3:], [dout])
    for a, b, name in zip(first, second, MODULATE_NAMES, strict=True):
        assert torch.equal(a, b), f"adaln_modulate {name} differs between runs"


def test_public_ops_dispatch_to_triton_under_interpreter() -> None:
    x, y, gate, shift, scale = residual_inputs(2, 7, 72)
    assert _runtime.current_backend(x) == "triton"
    out = adaln_modulate(x.requires_grad_(), shift, scale)
    assert type(out.grad_fn).__name__ == "AdaLNModulateFunctionBackward"
    assert torch.equal(out, fused_modulate(x, shift, scale))
    x_out, h = residual_gate_adaln(x, y, gate, shift, scale)
    assert type(h.grad_fn).__name__ == "ResidualGateAdaLNFunctionBackward"
    expected = fused_residual(x, y, gate, shift, scale)
    assert torch.equal(x_out, expected[0]) and torch.equal(h, expected[1])


def test_reference_backend_and_wide_rows_use_the_reference() -> None:
    x, y, gate, shift, scale = residual_inputs(2, 7, 72)
    with _runtime.force_backend("reference"):
        out = adaln_modulate(x, shift, scale)
        x_out, h = residual_gate_adaln(x, y, gate, shift, scale)
    assert torch.equal(out, adaln_modulate_ref(x, shift, scale))
    ref_x_out, ref_h = residual_gate_adaln_ref(x, y, gate, shift, scale)
    assert torch.equal(x_out, ref_x_out) and torch.equal(h, ref_h)
    wide = [t.requires_grad_() for t in modulate_inputs(1, 1, MAX_FUSED_D + 1)]
    out = adaln_modulate(*wide)
    assert "AdaLN" not in type(out.grad_fn).__name__
    assert torch.equal(out, adaln_modulate_ref(*wide))


@pytest.mark.parametrize("layout", ["fp32", "mixed"])
def test_torch_compile_fullgraph_matches_eager(layout: str) -> None:
    """The fake impls give compile the right dtypes: mixed is fp32 x with bf16 compute."""
    def block(x, y, gate, shift, scale):
        x_out, h = residual_gate_adaln(x, y, gate, shift, scale)
        return (adaln_modulate(h, shift, scale).float() * x_out).sum()

    inputs = residual_inputs(2, 8, 32)
    if layout == "mixed":
        inputs = mixed(inputs, torch.bfloat16)
    compiled = torch.compile(block, fullgraph=True)
    expected = run(block, inputs, [torch.tensor(1.0, device=DEVICE)])
    actual = run(compiled, inputs, [torch.tensor(1.0, device=DEVICE)])
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == e.dtype, f"compiled output/grad {i}: {a.dtype} != {e.dtype}"
        if a.dtype == torch.float32:
            assert_close_fp32(a, e, f"compiled output/grad {i}")
        else:  # the same kernels on the same inputs; allow one rounding of the reordering
            ulp = torch.finfo(a.dtype).eps * float(e.float().abs().max())
            assert float((a.float() - e.float()).abs().max()) <= ulp, f"grad {i}"


def test_bad_inputs_name_the_argument() -> None:
    x, y, gate, shift, scale = residual_inputs(2, 5, 16)
    cases = [
        (ValueError, "x must have shape", lambda: adaln_modulate(x[0], shift, scale)),
        (ValueError, "shift must have shape", lambda: adaln_modulate(x, shift[:1], scale)),
        (ValueError, "scale must have shape", lambda: adaln_modulate(x, shift, scale[:, :8])),
        (ValueError, "y must have shape",
         lambda: residual_gate_adaln(x, y[:, :3], gate, shift, scale)),
        (ValueError, "gate must have shape",
         lambda: residual_gate_adaln(x, y, gate[None], shift, scale)),
        (TypeError, "x must be float32", lambda: adaln_modulate(x.long(), shift, scale)),
        (TypeError, "gate must be float32",
         lambda: residual_gate_adaln(x, y, gate.int(), shift, scale)),
        (TypeError, "shift must be float32", lambda: adaln_modulate(x, shift.double(), scale)),
        (TypeError, "shift must be a torch.Tensor", lambda: adaln_modulate(x, 1.0, scale)),
        (TypeError, "shift is torch.float16", lambda: adaln_modulate(x, shift.half(), scale)),
        (TypeError, "y is torch.bfloat16",
         lambda: residual_gate_adaln(x, y.bfloat16(), gate, shift, scale)),
        (ValueError, "scale on meta", lambda: adaln_modulate(x, shift, scale.to("meta"))),
        (TypeError, "x \\(the residual stream\\) must be float32",
         lambda: adaln_modulate(x.bfloat16(), shift.half(), scale.half())),
        (TypeError, "share the dtype of y/gate/shift/scale",
         lambda: residual_gate_adaln(x.half(), y, gate, shift, scale)),
        (ValueError, "eps", lambda: adaln_modulate(x, shift, scale, eps=0.0)),
    ]
    for error, match, call in cases:
        with pytest.raises(error, match=match):
            call()


# ----------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [*DTYPES, "mixed"], ids=str)
@pytest.mark.parametrize("T", [205, 256])
def test_gpu_full_size_matches_reference(T: int, dtype: torch.dtype | str) -> None:
    """The "mixed" layout is bf16-autocast training's: fp32 x, everything else bf16."""
    B, D = 32, 1152
    if dtype == "mixed":
        inputs = mixed(residual_inputs(B, T, D, "cuda"), torch.bfloat16)
        grads = [torch.randn(B, T, D, device="cuda"),
                 torch.randn(B, T, D, device="cuda").bfloat16()]
    else:
        inputs = [t.to(dtype) for t in residual_inputs(B, T, D, "cuda")]
        grads = [torch.randn(B, T, D, device="cuda").to(dtype) for _ in range(2)]
    check_against_reference(fused_residual, residual_gate_adaln_ref, inputs, grads,
                            RESIDUAL_NAMES)
    modulate = [inputs[0], inputs[3], inputs[4]]
    dh = grads[1:] if dtype == "mixed" else grads[:1]  # the grad of h, in h's dtype
    check_against_reference(fused_modulate, adaln_modulate_ref, modulate, dh, MODULATE_NAMES)


@pytest.mark.gpu
def test_gpu_token_sums_are_bitwise_deterministic() -> None:
    B, T, D = 32, 256, 1152
    inputs = [t.bfloat16() for t in residual_inputs(B, T, D, "cuda")]
    grads = [torch.randn(B, T, D, device="cuda").bfloat16() for _ in range(2)]
    first = run(fused_residual, inputs, grads)
    second = run(fused_residual, inputs, grads)
    for a, b, name in zip(first, second, RESIDUAL_NAMES, strict=True):
        assert torch.equal(a, b), f"residual_gate_adaln {name} differs between runs"
    first = run(fused_modulate, [inputs[0], inputs[3], inputs[4]], grads[:1])
    second = run(fused_modulate, [inputs[0], inputs[3], inputs[4]], grads[:1])
    for a, b, name in zip(first, second, MODULATE_NAMES, strict=True):
        assert torch.equal(a, b), f"adaln_modulate {name} differs between runs"
