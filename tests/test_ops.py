"""The one eager call path shared by the adaLN, token and EDM ops (`sdkernels._ops`).

Eager calls must run the launchers directly, not through the torch.ops dispatcher (whose
host cost is larger than these kernels' device time); traced calls use the registered ops
(the compile tests of each family cover that side).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sdkernels
from sdkernels import _ops


class _OpNames(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _one_of_each() -> None:
    """Forward and backward of an op from every family, on the Triton path."""
    B, T, D = 2, 7, 72
    x = torch.randn(B, T, D, requires_grad=True)
    y = torch.randn(B, T, D, requires_grad=True)
    vecs = [torch.randn(B, D, requires_grad=True) for _ in range(3)]
    x_out, h = sdkernels.residual_gate_adaln(x, y, *vecs)
    ids = torch.stack([torch.randperm(T)[:4].sort().values for _ in range(B)])
    kept = sdkernels.gather_tokens(h, ids, check_ids=False)
    x0 = torch.randn(B, 4, 8, 8, requires_grad=True)
    sigma = torch.rand(B) + 0.1
    x_noisy, x_in, _ = sdkernels.edm_precondition(x0, torch.randn_like(x0), sigma, check=False)
    loss = sdkernels.edm_loss(x_in, x_noisy, x0.detach(), sigma, check=False)
    (loss.sum() + kept.sum() + x_out.sum()).backward()


def test_every_family_registers_through_kernel_op() -> None:
    families = {name.split("_")[0] for name in _ops.REGISTERED}
    assert {"adaln", "tokens", "edm"} <= families, families
    for name, op in _ops.REGISTERED.items():
        assert op.traced is getattr(torch.ops.sdkernels, name)


def test_eager_calls_skip_the_dispatcher_and_are_recorded(monkeypatch) -> None:
    assert sdkernels.current_backend(torch.zeros(1)) == "triton"
    dispatched: list[str] = []
    real = _ops.KernelOp.traced

    def spy(self):
        dispatched.append(self.name)
        return real.fget(self)

    monkeypatch.setattr(_ops.KernelOp, "traced", property(spy))
    with _ops.record_calls() as calls:
        _one_of_each()
    assert not dispatched, f"eager calls went through torch.ops: {dispatched}"
    recorded = {c.name for c in calls}
    assert {"adaln_residual_gate_fwd", "adaln_residual_gate_bwd", "tokens_gather",
            "tokens_scatter", "edm_precondition_fwd", "edm_precondition_bwd",
            "edm_loss_fwd", "edm_loss_bwd"} <= recorded, recorded
    fwd = next(c for c in calls if c.name == "adaln_residual_gate_fwd")
    assert fwd.inputs[:5] == (torch.float32,) * 5 and fwd.inputs[5] is None  # eps
    assert fwd.outputs == (torch.float32,) * 4  # x_out, h, mean, rstd


def test_dispatch_modes_see_the_registered_ops() -> None:
    """Under a Python dispatch mode the ops go through torch.ops: the mode sees them, and
    fake tensors get the fake implementation instead of reaching a kernel."""
    with _OpNames() as mode:
        _one_of_each()
    seen = {n.split(".")[1] for n in mode.names if n.startswith("sdkernels")}
    assert {"adaln_residual_gate_fwd", "adaln_residual_gate_bwd", "tokens_gather",
            "edm_loss_fwd"} <= seen, seen
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 7, 72)
        y, gate, shift, scale = torch.empty(2, 7, 72, dtype=torch.bfloat16), *(
            torch.empty(2, 72, dtype=torch.bfloat16) for _ in range(3))
        x_out, h = sdkernels.residual_gate_adaln(x, y, gate, shift, scale)
    assert (x_out.dtype, h.dtype, tuple(h.shape)) == (torch.float32, torch.bfloat16, (2, 7, 72))


def test_recording_stops_with_the_block() -> None:
    with _ops.record_calls() as calls:
        pass
    _one_of_each()
    assert calls == []


def test_no_grad_calls_skip_the_autograd_function() -> None:
    """Without a gradient to compute, every family calls its forward op directly (no
    autograd.Function, no saved tensors), with the same results as the autograd path."""
    B, T, D = 2, 7, 72
    x, y = torch.randn(B, T, D), torch.randn(B, T, D, dtype=torch.bfloat16)
    vecs = [torch.randn(B, D, dtype=torch.bfloat16) for _ in range(3)]
    ids = torch.stack([torch.randperm(T)[:4].sort().values for _ in range(B)])
    x0, sigma = torch.randn(B, 4, 8, 8), torch.rand(B) + 0.1

    def run_all(grad: bool) -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_(grad) for t in (x, y, *vecs, x0)]
        x_out, h = sdkernels.residual_gate_adaln(*leaves[:5])
        h2 = sdkernels.adaln_modulate(x_out, *leaves[3:5])
        kept = sdkernels.gather_tokens(h2, ids, check_ids=False)
        back = sdkernels.scatter_tokens(kept, ids, h2, check_ids=False)
        _, x_in, _ = sdkernels.edm_precondition(leaves[5], leaves[5], sigma, check=False)
        return [x_out, h, h2, kept, back, x_in]

    with _ops.record_calls() as calls:
        plain = run_all(grad=False)
    assert all(t.grad_fn is None for t in plain)
    names = [c.name for c in calls]
    assert names == ["adaln_residual_gate_fwd", "adaln_modulate_fwd", "tokens_gather",
                     "tokens_scatter", "edm_precondition_fwd"], names
    for a, b in zip(plain, run_all(grad=True), strict=True):
        assert b.grad_fn is not None and torch.equal(a, b.detach())
