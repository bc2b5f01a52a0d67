"""`sddit profile`: where a training step's time goes, phase by phase, and what each kernel
costs the GPU in registers and shared memory.

    sddit profile --model SD-DiT-tiny --steps 5          # CPU: a real trace of the CPU run
    sddit profile --model SD-DiT-XL/2 --batch 32         # CUDA: kernels, NVTX ranges too
    sddit profile --static [--kernels adaln]             # sm_80/sm_90 resources, no GPU needed

Runs `--warmup` then `--steps` training steps of the loop's own TrainStep (bench/step.py
builds it) under torch.profiler, each step fed by a data source through train.data's
TensorBatches (device-resident tensors of the model's shape). Ranges, as `record_function`
and, on CUDA, as NVTX ranges for Nsight Systems:
- data (the next batch), then the step's own phases (train/step.py): forward, backward,
  grad_norm, optimizer, teacher_ema, sampling_ema;
- inside the forward, attached from outside the model (forward hooks on its submodules and
  its method's `phase_range` around the loss's functional parts, set on this instance only and
  removed afterwards): noise
  (EDM preconditioning), embed (patch, time and label embedders), mask (keep ids, gather),
  student_encoder, decoder (scatter, decoder blocks, final layer), side_interpolater (MDT),
  teacher, heads (student head), losses (EDM, MAE, self-distillation, centre). What is left
  is "forward". Each method's own parts are marked (DiT has no teacher or heads; MDT runs
  its passes through the same ranges).

Writes into `--out-dir`: `trace.json` (Chrome / Perfetto: open in ui.perfetto.dev),
`tensorboard/` (a TensorBoard profile: `tensorboard --logdir .../tensorboard` with the
torch-tb-profiler plugin) and `profile.json` (the per-phase table in ms per step and %, the
top kernels, the attention / GEMM / fused / optimizer / EMA shares). On CPU the times are
the ops' self CPU times; on CUDA, kernel device times.

`--static` lowers every sdkernels kernel for sm_80 and sm_90 (sdkernels._lowering's
launch_cases: integer arguments specialised as a launch does, fp32 variants included) and
reports registers, spills and shared memory per kernel with the occupancy per SM computed
from them: resident blocks are limited by warps
(64 per SM), registers (64K per SM, allocated per warp in units of 256), shared memory
(164 KiB on sm_80, 228 KiB on sm_90, plus 1 KiB reserved per block) and 32 blocks per SM.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.profiler import record_function

from bench._harness import environment, module_main, write_json

PHASE_ORDER = ("data", "noise", "embed", "mask", "student_encoder", "teacher", "heads",
               "decoder", "side_interpolater", "losses", "forward", "backward", "grad_norm",
               "optimizer", "teacher_ema", "sampling_ema", "outside phases")
class Span:
    """A named range opened and closed by different hooks: record_function, plus NVTX on
    CUDA. Spans nest properly in time (each closes before its parent), as NVTX requires."""

    def __init__(self, name: str, nvtx: bool) -> None:
        self.name, self.nvtx, self.stack = f"phase:{name}", nvtx, []

    def open(self, *_: Any) -> None:
        rf = record_function(self.name)
        rf.__enter__()
        self.stack.append(rf)
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)

    def close(self, *_: Any) -> None:
        if not self.stack:
            return
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        self.stack.pop().__exit__(None, None, None)


def _spans(nvtx: bool) -> Callable[[str], contextlib.AbstractContextManager]:
    """A `phase_range` for the model: each phase name opens its own Span."""
    @contextlib.contextmanager
    def phase_range(name: str) -> Iterator[None]:
        span = Span(name, nvtx)
        span.open()
        try:
            yield
        finally:
            span.close()

    return phase_range


def _encoder_blocks(bb: torch.nn.Module) -> list[torch.nn.Module]:
    """The student encoder's blocks in call order (DiT backbone, or MDT's two halves)."""
    if hasattr(bb, "encoder"):
        return list(bb.encoder)
    return [*getattr(bb, "en_inblocks", []), *getattr(bb, "en_outblocks", [])]


def _span_hooks(net: torch.nn.Module, nvtx: bool) -> list[tuple[torch.nn.Module, str, Span]]:
    """(module, 'pre' | 'post', span.open/close) pairs marking each sub-phase."""
    bb, marks = net.backbone, []

    def around(module: torch.nn.Module | None, name: str) -> None:
        if module is not None:
            span = Span(name, nvtx)
            marks.extend([(module, "pre", span.open), (module, "post", span.close)])

    for part in ("x_embedder", "t_embedder", "y_embedder"):
        around(getattr(bb, part, None), "embed")
    around(getattr(net.method, "teacher", None), "teacher")  # SD-DiT's
    around(getattr(net.method, "head", None), "heads")
    for block in getattr(bb, "sideblocks", []):  # MDT's side-interpolater, in the decoder
        around(block, "side_interpolater")
    blocks = _encoder_blocks(bb)
    if blocks:  # from the first block's start to the last block's end
        enc = Span("student_encoder", nvtx)
        marks += [(blocks[0], "pre", enc.open), (blocks[-1], "post", enc.close)]
    # decoder: from the encoder's end (the scatter comes next) to the final layer's end
    dec = Span("decoder", nvtx)
    marks += [(blocks[-1] if blocks else bb.final_layer, "post", dec.open),
              (bb.final_layer, "post", dec.close)]
    return marks


@contextlib.contextmanager
def phase_ranges(net: torch.nn.Module, step_fn: Any = None, nvtx: bool = False
                 ) -> Iterator[None]:
    """Marks the forward's sub-phases on this net (forward hooks on its submodules, its
    method's `phase_range` for the loss's functional parts) and, with NVTX, the step's
    phases on this step; all on these instances only, and removed afterwards."""
    handles = []
    for module, when, fn in _span_hooks(net, nvtx):
        hook = module.register_forward_pre_hook if when == "pre" else module.register_forward_hook
        handles.append(hook(fn))
    net.method.phase_range = _spans(nvtx)
    step_range = getattr(step_fn, "phase_range", None)
    if nvtx and step_range is not None:  # the step's own phases as NVTX ranges too
        step_fn.phase_range = _nvtx_record_function
    try:
        yield
    finally:
        del net.method.phase_range  # back to the class's unmarked default
        if step_range is not None:
            step_fn.phase_range = step_range
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _nvtx_record_function(name: str) -> Iterator[None]:
    torch.cuda.nvtx.range_push(name)
    try:
        with record_function(name):
            yield
    finally:
        torch.cuda.nvtx.range_pop()


# ----------------------------------------------------------------------------- the run


def profile_run(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any]:
    """(the Breakdown of the active steps, the profiler) after warm-up + steps."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from bench._trace import breakdown
    from bench.step import batch_source, build_rig
    from train.loop import DataStream

    cuda = device.type == "cuda"
    rig = build_rig(args.model, args.path, args.batch, device, args.seed)
    stream = DataStream(batch_source(rig.net, args.batch, device, args.seed, num_batches=8))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sched = schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1)
    from tqdm.auto import tqdm

    with phase_ranges(rig.net, rig.step_fn, nvtx=cuda), profile(
            activities=activities, schedule=sched, record_shapes=False,
            on_trace_ready=_save_traces(args.out_dir)) as prof:
        for i in tqdm(range(args.warmup + args.steps), desc="profile", unit="step",
                      disable=None):
            with record_function("phase:data"):
                x, y = stream.next()
            rig.step_fn(x, y, rig.values(i))
            if cuda:
                torch.cuda.synchronize(device)
            prof.step()
    return breakdown(list(prof.events()), args.steps, cuda), prof


def _save_traces(out_dir: str) -> Callable[[Any], None]:
    """The profiler's trace can be saved once: as trace.json (Perfetto), then copied, gzipped,
    under the name TensorBoard's profile plugin looks for."""
    def handler(prof: Any) -> None:
        trace = os.path.join(out_dir, "trace.json")
        prof.export_chrome_trace(trace)
        tb_dir = os.path.join(out_dir, "tensorboard")
        os.makedirs(tb_dir, exist_ok=True)
        name = f"{socket.gethostname()}_{os.getpid()}.{time.time_ns()}.pt.trace.json.gz"
        with open(trace, "rb") as src, gzip.open(os.path.join(tb_dir, name), "wb") as dst:
            shutil.copyfileobj(src, dst)

    return handler


def ordered_phases(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rank = {p: i for i, p in enumerate(PHASE_ORDER)}
    return sorted(rows, key=lambda r: rank.get(r["phase"], len(rank)))


def print_report(report: dict[str, Any], label: str) -> None:
    print(f"\n{label}: {report['model']} batch {report['batch']}, path {report['path']}, "
          f"{report['steps']} profiled steps; {report['total_ms_per_step']:.2f} ms/step profiled")
    print(f"{'phase':<18}{'ms/step':>10}{'%':>7}")
    for row in report["phases"]:
        print(f"{row['phase']:<18}{row['ms_per_step']:>10.3f}{row['pct']:>7.1f}")
    print("shares: " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in report["shares"].items()))
    print(f"\ntop {'kernels' if report['device'] == 'cuda' else 'ops (self CPU time)'}:")
    print(f"{'ms/step':>9}{'%':>7}{'calls':>7}  name")
    for row in report["top_kernels"]:
        print(f"{row['ms_per_step']:>9.3f}{row['pct']:>7.1f}{row['calls_per_step']:>7.0f}  "
              f"{row['name'][:90]}")


# ----------------------------------------------------------------------------- --static

# Per-SM limits: (registers, max warps, max blocks, shared memory bytes usable by blocks).
SM_LIMITS = {80: (65536, 64, 32, 164 * 1024), 90: (65536, 64, 32, 228 * 1024)}
REG_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_RESERVED_PER_BLOCK = 1024  # the system's share on sm_80 and later


def occupancy(capability: int, registers: int | None, shared_bytes: int,
              num_warps: int) -> dict[str, Any]:
    """Resident blocks and warps per SM, what limits them, and the occupancy fraction."""
    regs_sm, max_warps, max_blocks, smem_sm = SM_LIMITS[capability]
    limits = {"warps": max_warps // num_warps, "blocks": max_blocks}
    if registers:
        per_warp = -(-registers * 32 // REG_UNIT) * REG_UNIT
        limits["registers"] = (regs_sm // per_warp) // num_warps
    if shared_bytes:
        limits["shared_memory"] = smem_sm // (shared_bytes + SMEM_RESERVED_PER_BLOCK)
    blocks = min(limits.values())
    limiter = min(limits, key=lambda k: limits[k])
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * num_warps,
            "occupancy": blocks * num_warps / max_warps, "limited_by": limiter}


_LOWER_SCRIPT = """
import json, sys
from dataclasses import asdict
from sdkernels._lowering import CAPABILITIES, launch_cases, lower
prefix = sys.argv[1]
for case in launch_cases():
    if not case.name.startswith(prefix):
        continue
    for cap in CAPABILITIES:
        try:
            row = asdict(lower(case, cap))
        except Exception as exc:
            row = {"name": case.name, "capability": cap, "error": repr(exc)}
        row["num_warps"] = case.num_warps
        print(json.dumps(row), flush=True)
"""


def static_report(prefix: str, timeout_s: float) -> list[dict[str, Any]]:
    """Lowers the kernels whose case name starts with `prefix` in a child process (the
    real compiler cannot run under TRITON_INTERPRET) and adds the occupancy per SM."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _LOWER_SCRIPT, prefix], capture_output=True,
                          text=True, env=env, cwd=root, timeout=timeout_s, check=False)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 and not rows:
        raise RuntimeError(f"lowering failed:\n{proc.stderr[-2000:]}")
    for row in rows:
        if "error" not in row:
            row.update(occupancy(row["capability"], row["registers"], row["shared_bytes"],
                                 row["num_warps"]))
    return rows


def print_static(rows: list[dict[str, Any]]) -> None:
    print(f"{'kernel':<40}{'sm':>4}{'warps':>6}{'regs':>6}{'spill B':>8}{'smem B':>8}"
          f"{'blocks/SM':>10}{'occ.':>6}  limited by")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<40}{r['capability']:>4}  FAILED {r['error'][:80]}")
            continue
        print(f"{r['name']:<40}{r['capability']:>4}{r['num_warps']:>6}"
              f"{r['registers'] if r['registers'] is not None else '?':>6}"
              f"{r['spill_bytes'] if r['spill_bytes'] is not None else '?':>8}"
              f"{r['shared_bytes']:>8}{r['blocks_per_sm']:>10}{100 * r['occupancy']:>5.0f}%"
              f"  {r['limited_by']}")


# ----------------------------------------------------------------------------- CLI


def add_profile_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="preset (default: SD-DiT-XL/2 on CUDA, SD-DiT-tiny on CPU)")
    p.add_argument("--batch", type=int, default=None, help="default: 32 on CUDA, 8 on CPU")
    p.add_argument("--steps", type=int, default=10, help="profiled steps")
    p.add_argument("--warmup", type=int, default=None, help="steps before (default 5 CUDA, 1 CPU)")
    p.add_argument("--path", default=None, choices=("eager", "kernels"),
                   help="model path (default: kernels on CUDA, eager on CPU)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=15, help="kernels listed")
    p.add_argument("--out-dir", default="bench-out/profile")
    p.add_argument("--static", action="store_true",
                   help="report registers, spills, shared memory and occupancy of every "
                   "kernel lowered for sm_80/sm_90 instead of profiling steps")
    p.add_argument("--kernels", default="", help="--static: only kernels whose name starts "
                   "with this (e.g. adaln, tokens.gather, edm)")


def _resolve(args: argparse.Namespace) -> torch.device:
    from train.distributed import resolve_device

    try:
        device = resolve_device(args.device, what="--device")
    except RuntimeError as exc:  # cuda asked for, none here: a bad argument like any other
        raise ValueError(str(exc)) from None
    cuda = device.type == "cuda"
    args.model = args.model or ("SD-DiT-XL/2" if cuda else "SD-DiT-tiny")
    args.batch = args.batch or (32 if cuda else 8)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.path = args.path or ("kernels" if cuda else "eager")
    if args.batch < 1 or args.steps < 1 or args.warmup < 0 or args.top < 1:
        raise ValueError("--batch, --steps and --top must be >= 1 and --warmup >= 0")
    import model

    model.make_config(args.model)  # an unknown preset fails here, before any work
    return device


def _run_static(args: argparse.Namespace) -> int:
    rows = static_report(args.kernels, timeout_s=900)
    if not rows:
        print(f"sddit profile --static: no kernel name starts with {args.kernels!r}",
              file=sys.stderr)
        return 2
    print_static(rows)
    out = os.path.join(args.out_dir, "static.json")
    write_json(out, {"env": environment(), "sm_limits": {str(k): v for k, v in
                                                         SM_LIMITS.items()}, "kernels": rows})
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in rows) else 1


def run_profile(args: argparse.Namespace) -> int:
    if args.static:
        return _run_static(args)
    try:
        device = _resolve(args)
    except ValueError as exc:
        print(f"sddit profile: {exc}", file=sys.stderr)
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    bd, _ = profile_run(args, device)
    trace = os.path.join(args.out_dir, "trace.json")
    report = {"env": environment(), "model": args.model, "batch": args.batch,
              "path": args.path, **bd.to_dict(args.top)}
    report["phases"] = ordered_phases(report["phases"])
    report["files"] = {"trace": trace, "tensorboard": os.path.join(args.out_dir, "tensorboard")}
    label = report["env"].get("device", "GPU") if device.type == "cuda" else "CPU"
    print_report(report, label)
    write_json(os.path.join(args.out_dir, "profile.json"), report)
    print(f"\nwrote {trace} (Perfetto / chrome://tracing), "
          f"{report['files']['tensorboard']}/ (TensorBoard) and "
          f"{os.path.join(args.out_dir, 'profile.json')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return module_main("python -m bench.profile", __doc__, add_profile_arguments, run_profile, argv)


if __name__ == "__main__":
    sys.exit(main())
