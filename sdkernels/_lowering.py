"""Compile a Triton kernel for a real GPU target without a GPU (sm_80, sm_90).

The interpreter accepts code that the real compiler rejects, so CI lowers every kernel
to PTX and cubin here and records the resources it would use.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class LoweringCase:
    """One kernel at one specialisation: `signature` maps every argument to a Triton type
    ("*bf16", "i32", "fp32", or "constexpr"), and `constexprs` gives the constexpr values."""

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    # Integer arguments whose launch values are multiples of 16 (e.g. D = 1152): a real
    # launch specialises on that, so the lowering should too.
    divisible_ints: tuple[str, ...] = ()


@dataclass(frozen=True)
class LoweringReport:
    name: str
    capability: int
    shared_bytes: int
    registers: int | None
    spill_bytes: int | None
    ptx_lines: int


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """Registers and spill stores per thread, read from the cubin by Triton's cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=False
        ).stdout
    regs = re.search(r"REG:(\d+)", out)
    spills = re.search(r"STACK:(\d+)", out)
    return (int(regs.group(1)) if regs else None, int(spills.group(1)) if spills else None)


def _divisibility_attrs(case: LoweringCase) -> dict[tuple[int, ...], list[list[Any]]]:
    """Torch allocations are 16-byte aligned, and the launcher specialises on it: mark
    every pointer (and the named ints) divisible by 16, as a real launch would."""
    names = case.kernel.arg_names
    marked = [n for n, t in case.signature.items() if t.startswith("*")]
    marked += list(case.divisible_ints)
    return {(names.index(n),): [["tt.divisibility", 16]] for n in marked}


def lower(case: LoweringCase, capability: int) -> LoweringReport:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=case.kernel, signature=case.signature, constexprs=case.constexprs,
                    attrs=_divisibility_attrs(case))
    compiled = triton.compile(
        src, target=GPUTarget("cuda", capability, 32), options={"num_warps": case.num_warps}
    )
    regs, stack = _resource_usage(compiled.asm["cubin"])
    return LoweringReport(
        name=case.name,
        capability=capability,
        shared_bytes=int(compiled.metadata.shared),
        registers=regs,
        spill_bytes=stack,
        ptx_lines=compiled.asm["ptx"].count("\n"),
    )


CAPABILITIES = (80, 90)


def all_cases() -> list[LoweringCase]:
    """Every family's cases, from `_lowering_cases` (imported here: it imports the op
    modules, which must not run at import of this module)."""
    from sdkernels import _lowering_cases

    return _lowering_cases.all_cases()


def main() -> None:
    """Lower every kernel for sm_80 and sm_90 and print one JSON report per line.

    Must run without TRITON_INTERPRET (under it, @triton.jit makes interpreted functions
    that cannot be compiled), so tests call this in a subprocess."""
    import json
    import sys
    from dataclasses import asdict

    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET to lower kernels for a GPU target")
    failed = 0
    for case in all_cases():
        for cap in CAPABILITIES:
            try:
                print(json.dumps(asdict(lower(case, cap))), flush=True)
            except Exception as exc:  # report every kernel, then fail
                failed += 1
                print(json.dumps({"name": case.name, "capability": cap, "error": repr(exc)}),
                      flush=True)
    sys.exit(1 if failed else 0)

