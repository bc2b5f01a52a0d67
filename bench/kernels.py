"""Kernel microbenchmark: each fused op against its eager reference and torch.compile of
that reference, at SD-DiT-XL/2 training shapes, forward and backward.

    python -m bench.kernels [--out bench-out/kernels.json] [--ops adaln,tokens,edm]

Method in bench/_harness.py. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

import torch

from bench._harness import (
    KernelCase,
    backward_fn,
    copy_bandwidth_gbs,
    cuda_median_ms,
    environment,
    forward_fn,
    write_json,
)

CASE_MODULES = {
    "adaln": "bench.cases.adaln",
    "tokens": "bench.cases.tokens",
    "edm": "bench.cases.edm",
}


def load_cases(families: list[str]) -> list[KernelCase]:
    cases: list[KernelCase] = []
    for family in families:
        if family not in CASE_MODULES:
            raise ValueError(
                f"--ops: unknown family {family!r}; choose from {sorted(CASE_MODULES)}"
            )
        cases += importlib.import_module(CASE_MODULES[family]).CASES
    return cases


def bench_case(case: KernelCase, copy_gbs: float, reps: int) -> list[dict[str, Any]]:
    device = torch.device("cuda")
    compiled = torch.compile(case.reference)
    providers = {"triton": case.triton, "eager": case.reference, "compile": compiled}
    rows = []
    for direction, nbytes in (("fwd", case.bytes_fwd), ("bwd", case.bytes_bwd)):
        times: dict[str, float] = {}
        for name, fn in providers.items():
            inputs = case.make_inputs(device)
            make = forward_fn if direction == "fwd" else backward_fn
            times[name] = cuda_median_ms(make(fn, inputs), reps=reps)
        for name, ms in times.items():
            gbs = nbytes / (ms * 1e-3) / 1e9
            rows.append(
                {
                    "op": case.op,
                    "shape": case.shape,
                    "direction": direction,
                    "provider": name,
                    "median_ms": ms,
                    "bytes": nbytes,
                    "gbs": gbs,
                    "pct_copy_bw": 100 * gbs / copy_gbs,
                    "speedup_vs_compile": times["compile"] / ms,
                }
            )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'op':<22}{'shape':<22}{'dir':<5}{'provider':<9}{'ms':>9}{'GB/s':>9}{'%copy':>7}"
        f"{'x cmp':>7}"
    )
    for r in rows:
        print(
            f"{r['op']:<22}{r['shape']:<22}{r['direction']:<5}{r['provider']:<9}"
            f"{r['median_ms']:>9.4f}{r['gbs']:>9.0f}{r['pct_copy_bw']:>7.1f}"
            f"{r['speedup_vs_compile']:>7.2f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="bench-out/kernels.json")
    parser.add_argument("--ops", default=",".join(CASE_MODULES))
    parser.add_argument("--reps", type=int, default=100)
    args = parser.parse_args(argv)
    families = [f for f in args.ops.split(",") if f]
    cases = load_cases(families)
    if not torch.cuda.is_available():
        print(f"bench.kernels: no CUDA device; {len(cases)} cases defined, nothing timed.")
        return 0
    copy_gbs = copy_bandwidth_gbs()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s")
    rows: list[dict[str, Any]] = []
    for case in cases:
        try:
            rows += bench_case(case, copy_gbs, args.reps)
        except Exception as exc:  # one failing op must not hide the others' numbers
            print(f"{case.op} {case.shape}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append({"op": case.op, "shape": case.shape, "error": repr(exc)})
    good = [r for r in rows if "error" not in r]
    print_table(good)
    write_json(args.out, {"env": environment(), "copy_gbs": copy_gbs, "results": rows})
    print(f"wrote {args.out}")
    return 0 if len(good) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
