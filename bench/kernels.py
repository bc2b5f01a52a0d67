"""Kernel microbenchmark: each fused op against its eager reference and torch.compile of
that reference, at SD-DiT-XL/2 training shapes, forward and backward.

    python -m bench.kernels [--out bench-out/kernels.json] [--ops adaln,tokens,edm]
                            [--budget-s 150]

Method in bench/_harness.py. Cases run most important first (every op once at the widest
shape, then the rest), and the JSON is rewritten after every case, so a run stopped by its
time box or by `--budget-s` keeps what it measured. Each case starts from a fresh dynamo
state and compiles the reference with `dynamic=False` (the shapes are fixed), so one
case's guards and recompiles never leak into the next. Without CUDA it says "no GPU",
writes a JSON that says so and exits 0.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
import time
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


def _width(case: KernelCase) -> int:
    match = re.search(r"\bD(\d+)", case.shape)
    return int(match.group(1)) if match else 0


def order_cases(cases: list[KernelCase]) -> list[KernelCase]:
    """Most important first: the first (widest, i.e. XL) case of each op, then the rest,
    keeping the families' order otherwise. A budget cut then still covers every op."""
    ranked = sorted(enumerate(cases), key=lambda ic: (-_width(ic[1]), ic[0]))
    seen: set[str] = set()
    first, rest = [], []
    for _, case in ranked:
        (rest if case.op in seen else first).append(case)
        seen.add(case.op)
    return first + rest


def bench_case(case: KernelCase, copy_gbs: float, reps: int) -> list[dict[str, Any]]:
    device = torch.device("cuda")
    torch._dynamo.reset()  # no guards or cache-size limits carried over from the last case
    compiled = torch.compile(case.reference, dynamic=False)
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


def _payload(env: dict[str, Any], copy_gbs: float | None, rows: list[dict[str, Any]],
             status: str, pending: list[KernelCase]) -> dict[str, Any]:
    return {"env": env, "status": status, "copy_gbs": copy_gbs, "results": rows,
            "not_run": [f"{c.op} {c.shape}" for c in pending]}


def run_cases(cases: list[KernelCase], args: argparse.Namespace, env: dict[str, Any]) -> int:
    """Times each case in order, rewriting args.out after each; stops before a case that
    would likely overrun --budget-s (estimated from the slowest case so far)."""
    start = time.monotonic()
    copy_gbs = copy_bandwidth_gbs()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s", flush=True)
    rows: list[dict[str, Any]] = []
    write_json(args.out, _payload(env, copy_gbs, rows, "running: 0 done", cases))
    slowest, status = 0.0, "complete"
    for i, case in enumerate(cases):
        elapsed = time.monotonic() - start
        if args.budget_s and elapsed + slowest > args.budget_s:
            status = f"budget: stopped after {i} of {len(cases)} cases ({elapsed:.0f} s)"
            print(f"bench.kernels: {status}", flush=True)
            write_json(args.out, _payload(env, copy_gbs, rows, status, cases[i:]))
            break
        t0 = time.monotonic()
        try:
            new = bench_case(case, copy_gbs, args.reps)
        except Exception as exc:  # one failing op must not hide the others' numbers
            print(f"{case.op} {case.shape}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr)
            new = [{"op": case.op, "shape": case.shape, "error": repr(exc)}]
        slowest = max(slowest, time.monotonic() - t0)
        rows += new
        print_table([r for r in new if "error" not in r])
        write_json(args.out, _payload(env, copy_gbs, rows, f"running: {i + 1} of {len(cases)}",
                                      cases[i + 1:]))
    else:
        write_json(args.out, _payload(env, copy_gbs, rows, status, []))
    print(f"wrote {args.out} ({status})")
    return 0 if all("error" not in r for r in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--out", default="bench-out/kernels.json")
    parser.add_argument("--ops", default=",".join(CASE_MODULES))
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="stop cleanly before a case that would end past this many "
                        "seconds (0: no budget)")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.budget_s < 0:
        parser.error(f"--budget-s must be >= 0, got {args.budget_s}")
    families = [f for f in args.ops.split(",") if f]
    cases = order_cases(load_cases(families))
    env = environment()
    if not torch.cuda.is_available():
        print(f"bench.kernels: no GPU (no CUDA device); {len(cases)} cases defined, "
              "nothing timed.")
        write_json(args.out, _payload(env, None, [], "no GPU", cases))
        return 0
    return run_cases(cases, args, env)


if __name__ == "__main__":
    sys.exit(main())
