"""One registration helper and one eager call path for every sdkernels launcher.

Each op family (adaLN, tokens, EDM) registers its forward and backward launchers here as
`torch.library` custom ops, so that `torch.compile(fullgraph=True)` sees opaque ops with
fake (shape/dtype) implementations. Eager calls do not go through `torch.ops`: the
dispatcher and the dynamo-disable wrapper around a custom op's Python kernel cost tens of
microseconds of host time per call, more than a small kernel takes on a GPU, and a DiT
step makes hundreds of these calls. So `KernelOp.__call__` runs the launcher directly
unless dynamo is tracing or a Python dispatch mode is active, when it calls the registered
op.

`record_calls()` lists the dtypes every launcher receives and returns (tests of the
mixed-precision path); when no recorder is active it costs one global lookup per call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

NAMESPACE = "sdkernels"


@dataclass(frozen=True)
class OpCall:
    """One eager launcher call: the dtype of each argument (None for a non-tensor or an
    absent optional tensor) and of each tensor it returned."""

    name: str
    inputs: tuple[torch.dtype | None, ...]
    outputs: tuple[torch.dtype, ...]


_recorder: list[OpCall] | None = None
REGISTERED: dict[str, KernelOp] = {}  # every op of every family, by name


@contextmanager
def record_calls() -> Iterator[list[OpCall]]:
    """Collect an `OpCall` for every eager sdkernels launcher call inside the block."""
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous


_dispatch_modes: Callable[[], int] = getattr(torch._C, "_len_torch_dispatch_stack", lambda: 0)


def needs_autograd(*tensors: torch.Tensor | None) -> bool:
    """Whether a gradient can flow: if not, a public op calls its forward KernelOp directly
    and skips the autograd.Function (its host overhead and saved tensors), as the teacher's
    no-grad forward and sampling do."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _dtypes(values: Any) -> tuple[torch.dtype | None, ...]:
    items = values if isinstance(values, tuple | list) else (values,)
    return tuple(v.dtype if isinstance(v, torch.Tensor) else None for v in items)


class KernelOp:
    """A launcher registered as `torch.ops.sdkernels.<name>`, callable as a function."""

    def __init__(self, name: str, launcher: Callable[..., Any], fake: Callable[..., Any]):
        self.name = name
        self.launcher = launcher
        # The schema is inferred from the launcher's type annotations.
        torch.library.custom_op(f"{NAMESPACE}::{name}", launcher, mutates_args=())
        torch.library.register_fake(f"{NAMESPACE}::{name}")(fake)
        REGISTERED[name] = self

    @property
    def traced(self) -> Callable[..., Any]:
        """The registered op, as torch.compile sees it."""
        return getattr(getattr(torch.ops, NAMESPACE), self.name)

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.traced(*args)
        # Under a Python dispatch mode (FakeTensorMode, FlopCounterMode, a test's spy) the
        # op goes through torch.ops, so the mode sees it and fake tensors get the fake impl.
        out = self.traced(*args) if _dispatch_modes() else self.launcher(*args)
        if _recorder is not None:
            outputs = tuple(d for d in _dtypes(out) if d is not None)
            _recorder.append(OpCall(self.name, _dtypes(args), outputs))
        return out

