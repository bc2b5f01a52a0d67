"""The `sddit bench` group and `sddit profile`, for the `sddit` command line.

    sddit bench step --model SD-DiT-tiny        # bench/step.py
    sddit bench chart --scale small             # bench/chart.py
    sddit profile --model SD-DiT-tiny --steps 5 # bench/profile.py

`BENCH_COMMANDS` is the group's registry: name -> (add-arguments function, run function,
help). A subcommand joins the group with one entry.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from bench import chart, precision_fid, profile, step

BENCH_COMMANDS: dict[str, tuple[Callable, Callable, str]] = {
    "step": (step.add_step_arguments, step.run_step,
             "training-step throughput of each path (eager, compile, kernels, both)"),
    "chart": (chart.add_chart_arguments, chart.run_chart,
              "the paper's steps/s-vs-FID chart (Fig. 3-5 analogues), small or paper scale"),
    "precision": (precision_fid.add_precision_arguments, precision_fid.run_precision,
                  "FID of the demo recipe trained in fp32 and in bf16 to the same step"),
}


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds `bench` with one subcommand per BENCH_COMMANDS entry."""
    p = subparsers.add_parser("bench", help="benchmarks: " + ", ".join(BENCH_COMMANDS),
                              description="Benchmarks. `sddit bench NAME --help` for each.")
    group = p.add_subparsers(dest="bench_command", required=True, metavar="NAME")
    for name, (add, run, help_text) in BENCH_COMMANDS.items():
        sub = group.add_parser(name, help=help_text, description=help_text)
        add(sub)
        sub.set_defaults(bench_run=run)
    return p


def run_bench(args: argparse.Namespace) -> int:
    return int(args.bench_run(args) or 0)


def add_profile_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("profile", help="profile training steps per phase (or --static "
                              "kernel resources)", description=profile.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    profile.add_profile_arguments(p)
    return p


def run_profile(args: argparse.Namespace) -> int:
    return int(profile.run_profile(args) or 0)


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.cli bench step ...` / `python -m bench.cli profile ...`."""
    parser = argparse.ArgumentParser(prog="python -m bench.cli")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(subparsers).set_defaults(func=run_bench)
    add_profile_parser(subparsers).set_defaults(func=run_profile)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    import sys

    sys.exit(main())
