"""Compile a Triton kernel for a real GPU target without a GPU (sm_80, sm_90).

The interpreter accepts code that the real compiler rejects, so CI lowers every kernel
to PTX and cubin here and records the resources it would use.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, replace
from typing import Any

from sdkernels import _lowering_cases
from sdkernels._lowering_cases import LoweringCase


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


def launch_spec(value: int) -> tuple[str, str | int]:
    """What a Triton launch makes of an int argument: ("constexpr", 1) for 1, else its type
    ("i32" or "i64") and "D" when divisible by 16, as triton/runtime/jit.py's specialiser
    does (triton 3.6 to 3.9)."""
    if value == 1:
        return "constexpr", 1
    kind = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
    return kind, "D" if value % 16 == 0 else ""


def specialise(case: LoweringCase) -> LoweringCase:
    """The case as a launch with `case.launch_ints` would compile it: ints equal to 1 become
    constexprs, the others take their launch type, multiples of 16 join divisible_ints."""
    if not case.launch_ints:
        return case
    unknown = sorted(set(case.launch_ints) - set(case.signature))
    if unknown:
        raise ValueError(f"{case.name}: launch_ints {unknown} are not arguments of the kernel")
    signature, constexprs = dict(case.signature), dict(case.constexprs)
    divisible = list(case.divisible_ints)
    for name, value in case.launch_ints.items():
        if signature[name] == "constexpr":  # the case already fixed it
            continue
        kind, spec = launch_spec(int(value))
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = spec
        elif spec == "D" and name not in divisible:
            divisible.append(name)
    return replace(case, signature=signature, constexprs=constexprs,
                   divisible_ints=tuple(divisible), launch_ints={})


def _divisibility_attrs(case: LoweringCase) -> dict[tuple[int, ...], list[list[Any]]]:
    """Torch allocations are 16-byte aligned, and the launcher specialises on it: mark
    every pointer (and the named ints) divisible by 16, as a real launch would."""
    names = case.kernel.arg_names
    marked = [n for n, t in case.signature.items() if t.startswith("*")]
    marked += list(case.divisible_ints)
    return {(names.index(n),): [["tt.divisibility", 16]] for n in marked}


def lower(case: LoweringCase, capability: int) -> LoweringReport:
    import triton

    case = specialise(case)
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
    """Every family's cases (`_lowering_cases`, which this module imports one way)."""
    return _lowering_cases.all_cases()


# Launch values, at the SD-DiT-XL/2 training shapes every case is written for (B = 32,
# L = 256 tokens, K = 205 kept, D = 1152; EDM latents of N = 4 x 32 x 32 per sample), of
# the integer arguments whose value those shapes fix, per kernel family. Applied to a case
# that gives no value of its own for the name. Other ints (tile counts, chunk counts, T,
# which is 256 or 205 by block) stay unspecialised unless the case gives launch_ints.
XL_LAUNCH_INTS: dict[str, dict[str, int]] = {
    "adaln.": {"D": 1152},
    "tokens.": {"B": 32, "L": 256, "K": 205, "D": 1152, "n_rows": 32 * 205},
    "edm.": {"N": 4 * 32 * 32},
}


def _fp32_variant(case: LoweringCase) -> LoweringCase | None:
    """The case with its bf16/fp16 tensors in fp32 (None when it has none)."""
    if not any(t in ("*bf16", "*fp16") for t in case.signature.values()):
        return None
    sig = {n: "*fp32" if t in ("*bf16", "*fp16") else t for n, t in case.signature.items()}
    return replace(case, name=f"{case.name}.fp32", signature=sig)


def launch_cases(cases: list[LoweringCase] | None = None) -> list[LoweringCase]:
    """The cases as launches compile them: XL_LAUNCH_INTS filled in where a case gives no
    value, and an fp32 variant of the first case of every kernel that has no fp32 case
    yet (fp32 is a supported dtype, and its wider loads change registers and vectorising)."""
    cases = all_cases() if cases is None else cases
    out: list[LoweringCase] = []
    for case in cases:
        family = next((v for k, v in XL_LAUNCH_INTS.items() if case.name.startswith(k)), {})
        defaults = {n: v for n, v in family.items()
                    if n in case.signature and case.signature[n] in ("i32", "i64")
                    and n not in case.launch_ints and n not in case.divisible_ints}
        out.append(replace(case, launch_ints={**defaults, **case.launch_ints})
                   if defaults else case)
    has_fp32 = {id(c.kernel) for c in out
                if not any(t in ("*bf16", "*fp16") for t in c.signature.values())}
    for case in list(out):
        if id(case.kernel) not in has_fp32 and (variant := _fp32_variant(case)) is not None:
            out.append(variant)
            has_fp32.add(id(case.kernel))
    return out


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
    for case in launch_cases():
        for cap in CAPABILITIES:
            try:
                print(json.dumps(asdict(lower(case, cap))), flush=True)
            except Exception as exc:  # report every kernel, then fail
                failed += 1
                print(json.dumps({"name": case.name, "capability": cap, "error": repr(exc)}),
                      flush=True)
    sys.exit(1 if failed else 0)

