"""The `sddit` command line: train | sample | prepare-latents | eval | demo.

    sddit train --config configs/tiny.toml --set schedule.total_steps=500 --set optim.lr=3e-4
    sddit train --config configs/tiny.toml --resume            # continue run.dir's newest
    torchrun --nproc-per-node 8 -m train.cli train --config configs/sd-dit-xl2.toml
    sddit sample --ckpt runs/tiny --num 64 --cfg-scale 1.5
    sddit demo --minutes 10

`python -m train.cli ...` is the same program.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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


def _add_optional(subparsers: argparse._SubParsersAction, name: str, module: str,
                  add: str, run: str, help_text: str) -> None:
    """Registers a subcommand that another package provides; if it cannot be imported the
    command still exists and explains why it is unavailable."""
    try:
        mod = importlib.import_module(module)
        getattr(mod, add)(subparsers)
        runner = getattr(mod, run)
        parser = subparsers.choices[name]
        parser.set_defaults(func=runner)
    except (ImportError, AttributeError) as exc:
        reason = f"{module} is unavailable: {exc}"
        p = subparsers.add_parser(name, help=f"{help_text} (unavailable)", add_help=True)
        p.set_defaults(func=lambda _args: _unavailable(name, reason))


def _unavailable(name: str, reason: str) -> int:
    print(f"sddit {name}: {reason}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sddit", description="SD-DiT trainer")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_train_parser(subparsers)
    subparsers.choices["train"].set_defaults(func=run_train)
    add_sample_parser(subparsers)
    subparsers.choices["sample"].set_defaults(func=run_sample)
    _add_optional(subparsers, "prepare-latents", "train.latents", "add_prepare_latents_parser",
                  "run_prepare_latents", "encode an image folder into VAE latent shards")
    _add_optional(subparsers, "eval", "metrics.cli", "add_eval_parser", "run_eval",
                  "FID of a checkpoint")
    from train.demo import add_demo_parser, run_demo

    add_demo_parser(subparsers)
    subparsers.choices["demo"].set_defaults(func=run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import CorruptCheckpointError
    from train.config import ConfigError, UsageError

    args = build_parser().parse_args(argv)
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
