"""The `sddit` command line: train | sample | prepare-latents | eval | demo | bench | profile.

    sddit train --config configs/tiny.toml --set schedule.total_steps=500 --set optim.lr=3e-4
    sddit train --config configs/tiny.toml --resume            # continue run.dir's newest
    torchrun --nproc-per-node 8 -m sddit train --config configs/sd-dit-xl2.toml
    sddit sample --ckpt runs/tiny --num 64 --cfg-scale 1.5
    sddit demo --steps 1100

`python -m sddit ...` is the same program.
"""

from __future__ import annotations

import argparse
import os
import sys

from bench.cli import add_bench_parser, add_profile_parser, run_bench, run_profile
from sddit.demo import add_demo_parser, run_demo
from sddit.eval import add_eval_parser, run_eval
from sddit.prepare_latents import add_prepare_latents_parser, run_prepare_latents
from train.sample import add_sample_parser, run_sample


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a model from a TOML config",
                              description="Trains as configured; launch with torchrun for "
                              "several GPUs or nodes.")
    p.add_argument("--config", default=None, help="TOML config (e.g. configs/tiny.toml) or a "
                   "run's config.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=2e-4 (TOML literal)")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CKPT",
                   help="continue from run.dir's newest valid checkpoint, or from CKPT (a "
                   "file or a run folder); an older CKPT rolls back, moving newer checkpoints "
                   "into run.dir/abandoned-<time>/")
    p.add_argument("--fresh", action="store_true",
                   help="start a new run in a run.dir that holds checkpoints, moving them "
                   "into run.dir/previous-<time>/ (nothing is deleted)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though batch size, seed, data or model changed (the "
                   "continued run is then not the one the checkpoint started)")


def run_train(args: argparse.Namespace) -> int:
    from train.checkpoint import CheckpointWriteError
    from train.config import load_config
    from train.distributed import shutdown_distributed
    from train.loop import NonFiniteLossError, TrainingInterrupted, train

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, resume=args.resume, fresh=args.fresh,
                       allow_config_change=args.allow_config_change)
    except TrainingInterrupted as exc:
        print(f"sddit train: {exc}", file=sys.stderr)
        return 128 + exc.signum
    except (NonFiniteLossError, CheckpointWriteError) as exc:
        print(f"sddit train: {exc}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    if result.sample_grid or result.loss_curve:  # main rank only
        print(f"trained {result.step} steps ({result.stopped_by}); run folder {result.run_dir}")
        print(f"  checkpoint:  {result.checkpoint}")
        print(f"  samples:     {result.sample_grid}")
        print(f"  loss curve:  {result.loss_curve}")
        print(f"  metrics:     {result.metrics}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every command, each registered by the layer that runs it."""
    parser = argparse.ArgumentParser(prog="sddit", description="SD-DiT trainer")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    subparsers.choices["train"].set_defaults(func=run_train)
    add_sample_parser(subparsers)
    subparsers.choices["sample"].set_defaults(func=run_sample)
    add_prepare_latents_parser(subparsers)
    subparsers.choices["prepare-latents"].set_defaults(func=run_prepare_latents)
    add_eval_parser(subparsers)
    subparsers.choices["eval"].set_defaults(func=run_eval)
    add_demo_parser(subparsers)
    subparsers.choices["demo"].set_defaults(func=run_demo)
    add_bench_parser(subparsers).set_defaults(func=run_bench)
    add_profile_parser(subparsers).set_defaults(func=run_profile)
    return parser


def _use_project_inductor_cache() -> None:
    """Compiled kernels go to build/inductor-cache of a source checkout (what `make`
    exports too), so a second run reuses them instead of compiling again; a
    TORCHINDUCTOR_CACHE_DIR set by the user wins."""
    from train.execution import default_inductor_cache

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "pyproject.toml")):
        default_inductor_cache(root)


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import CorruptCheckpointError
    from train.config import ConfigError, UsageError

    args = build_parser().parse_args(argv)
    _use_project_inductor_cache()
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        kind = "error" if isinstance(exc, UsageError) else "config error"
        print(f"sddit {args.command}: {kind}: {exc}", file=sys.stderr)
        return 2
    except CorruptCheckpointError as exc:
        print(f"sddit {args.command}: bad checkpoint: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
