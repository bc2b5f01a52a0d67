"""The chart: training speed against FID for every registered method (the paper's Fig. 3-5).

    python -m bench.chart --scale small                  # ~45 min on a 2-core CPU
    python -m bench.chart --scale small --plan long      # tighter numbers, hours on CPU
    torchrun --nproc-per-node 8 -m bench.chart --scale paper --reference ADM_REF.npz
    python -m bench.chart --scale paper --throughput-only   # the steps/s half, one GPU

What it does. Every method in `model.METHODS` is trained by one recipe (same steps, batch,
optimiser, seed and therefore data order; `configs/chart/<scale>`), stopped at each
checkpoint step, and its sampling EMA scored there: FID and precision/recall (k = 3) of N
samples (EDM Heun, same N, steps, CFG and seeds for every method) against a held-out
reference. Steps/s is the median over the run's logged windows (the first window of each
training invocation, which holds start-up and warm-up, is left out); images/s is steps/s
x batch; training GFLOPs per image come from `model.flops_per_image(net, train=True)` and
"patches" from `model.encoder_patches`. An SD-DiT mask-ratio sweep gives Figure 5.

Each point is a JSON file in `--out/points/`; a rerun skips finished points and resumes each
training run from its newest checkpoint, so an interrupted chart continues where it
stopped. Training runs live in `--work-dir` (checkpoints never go into `--out`); they are
deleted at the end unless `--keep-checkpoints`. `chart.json` summarises every point and
says whether the paper's ordering holds; `chart_plot` draws the pictures.

FID from a few hundred samples is biased upwards against FID-50K (the bias shrinks like
1/N); compare methods only at equal N, which this chart guarantees.

This file is the command line; the work is in chart_plan.py (settings and the runs they
make), chart_run.py (training, scoring, the points and the throughput-only run),
chart_summary.py (chart.json and the verdict) and chart_plot.py (the pictures).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import model
from bench._harness import module_main
from bench.chart_plan import (
    SMALL_PLANS,
    ChartError,
    Settings,
    build_plan,
    pin_precision,
    run_config,
    settings_from_args,
)
from bench.chart_run import check_samples_decodable, run_chart_plan, throughput_only
from bench.chart_summary import format_summary

# ----------------------------------------------------------------------------- CLI


def add_chart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", choices=("small", "paper"), default="small",
                        help="small: tiny models on animal-mnist (CPU-sized); paper: XL/2 "
                             "and S/2 on ImageNet-256 latents, 8 GPUs via torchrun")
    parser.add_argument("--plan", choices=tuple(SMALL_PLANS), default="default",
                        help="small scale: 'default' fits ~45 CPU minutes, 'long' is tighter")
    parser.add_argument("--methods", default=None,
                        help=f"comma list, chart order; default every registered method "
                             f"({', '.join(model.METHODS)})")
    parser.add_argument("--steps", default=None,
                        help="comma list of checkpoint steps; the last is every run's length")
    parser.add_argument("--fid-samples", type=int, default=None, help="N samples per FID")
    parser.add_argument("--mask-ratios", default=None,
                        help="SD-DiT sweep for Fig. 5 (default 0,0.2,0.4,0.6; '' skips it)")
    parser.add_argument("--seeds", default=None, help="comma list; several give error bars "
                        "(default 0; the long plan: 0,1,2)")
    parser.add_argument("--out", default=None, help="results folder (default "
                        "bench/results/chart-<scale>): point JSONs, chart.json, pictures")
    parser.add_argument("--work-dir", default=None,
                        help="training runs and checkpoints (default runs/chart-<scale>)")
    parser.add_argument("--reference", default=None, help="FID reference (default "
                        "animal-mnist:test; paper: ADM's VIRTUAL_imagenet256_labeled.npz)")
    parser.add_argument("--cache-dir", default=None,
                        help="where FID reference statistics are cached (default $SDDIT_CACHE "
                             "or ~/.cache/sddit)")
    parser.add_argument("--sampler-steps", type=int, default=None,
                        help="EDM Heun steps (default 12 small, 18 paper)")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="guidance (1 = none)")
    parser.add_argument("--fid-batch", type=int, default=None)
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="config override applied to every run alike (repeatable)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: 1 on CPU, where a second thread on shared "
                             "cores was measured to slow small steps down; else torch's)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep the training runs in --work-dir after the chart")
    parser.add_argument("--throughput-only", action="store_true",
                        help="only the steps/s half, on one device (paper scale: CUDA)")
    parser.add_argument("--no-progress", action="store_true")


def run_chart(args: argparse.Namespace) -> int:
    from train.config import ConfigError

    try:
        settings = settings_from_args(args)
        _check_reference(settings)
        for spec in build_plan(settings):  # every run's config resolves before any work
            run_config(settings, spec)
        if not args.throughput_only and (settings.scale != "paper" or torch.cuda.is_available()):
            check_samples_decodable(settings, build_plan(settings))  # (else refused below)
    except (ChartError, ConfigError, ValueError) as exc:
        print(f"bench.chart: {exc}", file=sys.stderr)
        return 2
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    elif not torch.cuda.is_available():
        torch.set_num_threads(1)
    settings, decided = pin_precision(settings)
    if decided:
        print(f"bench.chart: every run trains in {decided}")
    if args.throughput_only:
        return throughput_only(settings)
    if settings.scale == "paper" and not torch.cuda.is_available():
        print("bench.chart: --scale paper trains XL/2 for 400k steps on 8 GPUs; there is no "
              "CUDA device here. Use --scale small, or --throughput-only on a GPU.",
              file=sys.stderr)
        return 2
    from train.loop import TrainingInterrupted

    try:
        summary = run_chart_plan(settings)
    except TrainingInterrupted as exc:  # SIGTERM / Ctrl-C: the run in progress saved
        print(f"bench.chart: {exc}. Finished points are kept; rerun the same command to "
              "continue from there.", file=sys.stderr)
        return 128 + exc.signum
    if summary:  # rank 0
        print(format_summary(summary))
    return 0


def _check_reference(settings: Settings) -> None:
    ref = settings.reference
    if ref.endswith(".npz") and not os.path.isfile(ref):
        raise ChartError(f"--reference: {ref} not found")


def main(argv: list[str] | None = None) -> int:
    return module_main("python -m bench.chart", __doc__, add_chart_arguments, run_chart, argv)


if __name__ == "__main__":
    sys.exit(main())
