"""Former name of the training-step bench; kept so that old commands keep working.

    python -m bench.train_step --model SD-DiT-XL/2 --batch 32 [--variants kernels,reference,compile]

It runs `bench.step` (`sddit bench step`), which times the loop's real TrainStep. Variant
names map to paths: reference -> eager, compile -> compile, kernels -> kernels.
"""

from __future__ import annotations

import sys

from bench.step import main as step_main

_ALIASES = {"reference": "eager", "compile": "compile", "kernels": "kernels",
            "eager": "eager", "kernels+compile": "kernels+compile"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--variants" in argv:
        i = argv.index("--variants")
        names = [v for v in argv[i + 1].split(",") if v]
        unknown = [v for v in names if v not in _ALIASES]
        if unknown:
            print(f"bench.train_step: --variants: unknown {unknown}; use {sorted(_ALIASES)}",
                  file=sys.stderr)
            return 2
        argv[i:i + 2] = ["--paths", ",".join(_ALIASES[v] for v in names)]
    return step_main(argv)


if __name__ == "__main__":
    sys.exit(main())
