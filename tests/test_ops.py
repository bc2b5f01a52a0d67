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


def test_eager_calls_skip_the_dispatcher_and_are_recorded() -> None:
    assert sdkernels.current_backend(torch.zeros(1)) == "triton"
    with _ops.record_calls() as calls, _OpNames() as mode:
        _one_of_each()
    dispatched = [n for n in mode.names if n.startswith("sdkernels")]
    assert not dispatched, f"eager calls went through torch.ops: {dispatched}"
    recorded = {c.name for c in calls}
    assert {"adaln_residual_gate_fwd", "adaln_residual_gate_bwd", "tokens_gather",
            "tokens_scatter", "edm_precondition_fwd", "edm_precondition_bwd",
            "edm_loss_fwd", "edm_loss_bwd"} <= recorded, recorded
    fwd = next(c for c in calls if c.name == "adaln_residual_gate_fwd")
    assert fwd.inputs[:5] == (torch.float32,) * 5 and fwd.inputs[5] is None  # eps
    assert fwd.outputs == (torch.float32,) * 4  # x_out, h, mean, rstd


def test_recording_stops_with_the_block() -> None:
    with _ops.record_calls() as calls:
        pass
    _one_of_each()
    assert calls == []
