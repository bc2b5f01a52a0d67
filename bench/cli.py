"""The `sddit bench` group and `sddit profile`, for the `sddit` command line.

    sddit bench step --model SD-DiT-tiny        # bench/step.py
    sddit profile --model SD-DiT-tiny --steps 5 # bench/profile.py

`BENCH_COMMANDS` is the group's registry: name -> (module, add-arguments function, run
function, help). A subcommand joins the group with one entry; its module is imported only
when the parser is built.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

BENCH_COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "step": ("bench.step", "add_step_arguments", "run_step",
             "training-step throughput of each path (eager, compile, kernels, both)"),
    # helper C's chart, once bench/chart.py is merged:
    # "chart": ("bench.chart", "add_chart_arguments", "run_chart", "steps/s vs FID chart"),
}


def _load(module: str, attr: str) -> Callable:
    return getattr(importlib.import_module(module), attr)


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds `bench` with one subcommand per BENCH_COMMANDS entry."""
    p = subparsers.add_parser("bench", help="benchmarks: " + ", ".join(BENCH_COMMANDS),
                              description="Benchmarks. `sddit bench NAME --help` for each.")
    group = p.add_subparsers(dest="bench_command", required=True, metavar="NAME")
    for name, (module, add, run, help_text) in BENCH_COMMANDS.items():
        sub = group.add_parser(name, help=help_text, description=help_text)
        _load(module, add)(sub)
        sub.set_defaults(bench_run=(module, run))
    return p


def run_bench(args: argparse.Namespace) -> int:
    module, run = args.bench_run
    return int(_load(module, run)(args) or 0)


def add_profile_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from bench.profile import add_profile_arguments

    p = subparsers.add_parser("profile", help="profile training steps per phase (or --static "
                              "kernel resources)", description=_load("bench.profile",
                                                                     "__doc__"))
    add_profile_arguments(p)
    return p


def run_profile(args: argparse.Namespace) -> int:
    from bench.profile import run_profile as run

    return int(run(args) or 0)


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
