"""The lowering specialises integer arguments as a real launch does, and covers fp32.

Triton's launcher compiles a kernel per specialisation: an int argument equal to 1 becomes
a constexpr, one divisible by 16 is marked so (D = 1152 gives vector loads, fewer
registers). A lowering that omits it reports resources of code that never runs."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from sdkernels._lowering import LoweringCase, launch_spec, specialise


def test_launch_rule_matches_tritons_own() -> None:
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        pytest.skip("this triton has no native_specialize_impl to compare with")
    for value in (1, 2, 16, 205, 256, 1152, 6560, 2**31 - 16, 2**31, 2**33):
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)[:2]
        assert launch_spec(value) == (kind, spec), value


def _case(**launch_ints: int) -> LoweringCase:
    args = ["out_ptr", "x_ptr", "ids_ptr", "n_rows", "K", "D", "tiles_per_prog", "BLOCK"]
    sig = {a: "*bf16" if a.endswith("_ptr") else "i32" for a in args}
    sig["BLOCK"] = "constexpr"
    return LoweringCase("t", SimpleNamespace(arg_names=args), sig, {"BLOCK": 256},
                        launch_ints=launch_ints)


def test_specialise_marks_divisible_and_folds_ones() -> None:
    case = specialise(_case(D=1152, K=205, tiles_per_prog=1, n_rows=2**33))
    assert case.divisible_ints == ("D", "n_rows")
    assert case.signature["tiles_per_prog"] == "constexpr"
    assert case.constexprs["tiles_per_prog"] == 1
    assert case.signature["K"] == "i32" and case.signature["n_rows"] == "i64"
    with pytest.raises(ValueError, match="not arguments"):
        specialise(_case(nope=16))


# Building the cases needs real @triton.jit functions, which TRITON_INTERPRET=1 (set for
# the suite) replaces: they are listed in a child process without it.
_LIST_CASES = """
import json
from sdkernels._lowering import launch_cases, specialise
out = []
for case in launch_cases():
    spec = specialise(case)
    out.append({"name": case.name, "kernel": case.kernel.__name__ if hasattr(case.kernel,
                "__name__") else case.kernel.fn.__name__, "signature": spec.signature,
                "divisible": list(spec.divisible_ints)})
print(json.dumps(out))
"""


def _child(script: str, timeout: float = 240) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_launch_cases_cover_xl_shapes_and_fp32() -> None:
    cases = json.loads(_child(_LIST_CASES))
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names))
    for case in cases:
        if case["signature"].get("D") in ("i32", "i64"):
            assert "D" in case["divisible"], case["name"]
        if case["name"].startswith("tokens.") and "L" in case["signature"]:
            assert {"L", "D"} <= set(case["divisible"]), case["name"]
    all_fp32 = {c["kernel"] for c in cases
                if not any(t in ("*bf16", "*fp16") for t in c["signature"].values())}
    assert all_fp32 == {c["kernel"] for c in cases}


@pytest.mark.timeout(300)
def test_specialisation_reaches_the_compiler() -> None:
    """Lowered for sm_90 with and without D = 1152 marked: different code, fewer registers."""
    script = (
        "import json\n"
        "from dataclasses import replace\n"
        "from sdkernels._lowering import launch_cases, lower\n"
        "case = next(c for c in launch_cases() if c.name == 'tokens.gather.i32')\n"
        "rows = [lower(c, 90) for c in (replace(case, launch_ints={}), case)]\n"
        "print(json.dumps([[r.registers, r.ptx_lines] for r in rows]))\n")
    (plain_regs, plain_lines), (launch_regs, launch_lines) = json.loads(_child(script))
    assert launch_lines != plain_lines
    assert launch_regs < plain_regs
