"""`sddit bench step`: throughput of the real training step, path by path.

    sddit bench step --model SD-DiT-XL/2 --batch 32          # a GPU: all four paths
    sddit bench step --model SD-DiT-tiny                     # CPU: the tiny preset, labelled
    python -m bench.step --paths eager,kernels --out bench-out/step.json

What is timed is `train.step.TrainStep`, the loop's own step: forward (loss module under
autocast), backward, global grad norm with clipping, the finite check, the optimizer, SD-DiT's
teacher momentum and the sampling EMA, fed the loss inputs the loop's schedule gives. It is
built by the loop's own set-up (`train.loop.set_up`, default config: optimizer, wrappers,
compile, autocast), for one process, with the model built directly on the device.

Paths, in one process (each on a fresh model with the same seed). On CUDA:
- `eager`: the plain-torch model with torch's optimizer (fused AdamW, foreach EMA updates);
- `compile`: `torch.compile` of the plain-torch loss module (the strongest practical
  alternative), `dynamic=False`, torch's optimizer;
- `kernels`: the sdkernels fused ops (on CPU without TRITON_INTERPRET they fall back to
  their references; the JSON says which backend ran) and `run.fused_optimizer="auto"`
  (the one-pass Triton AdamW + teacher + EMA on CUDA);
- `kernels+compile`: the same under `torch.compile`;
- opt-in, one change at a time against `kernels`: `kernels+torch-optim` (torch's
  optimizer instead of the one-pass one) and `kernels+graphs` (`run.cuda_graphs`: the
  whole step captured once and replayed; CUDA only, torch's optimizer, as it requires).
On CPU (the default there), one change at a time from today's default to the fast path:
- `fp32-eager`: fp32, no compilation (`run.precision="fp32"`, `run.compile="off"`);
- `bf16-eager`: bf16 autocast, no compilation;
- `bf16-compile`: bf16 autocast under torch.compile;
- `auto`: what a long run's defaults choose on this machine (`run.precision="auto"`
  measures a bf16 against an fp32 matmul, `run.compile="auto"` compiles a long CPU run).
Compiled paths run last, so a time box that cuts a cold compile keeps the eager numbers;
each row records its compile time apart from the timed steps. Each row says which
optimizer ran, whether the step was a graph, and its compute dtype.

Method: `--warmup` steps, then `--steps` timed steps. On CUDA each step is bracketed by CUDA
events (no host sync inside the loop; one at the end), and images/s comes from the wall time
of the whole timed loop; on CPU, perf_counter per step. Reported: median step time and its
spread (p10, p90, min, max), steps/s, images/s, peak memory (CUDA: max allocated during the
timed steps; CPU: the process's peak RSS), achieved TFLOP/s from the analytic FLOPs
(`model.flops_per_image(net, train=True)`), MFU against the datasheet bf16 peak and against a
large matmul in the row's own compute dtype measured in the same run (fp32 rows against the
fp32 matmul, bf16 rows against the bf16 one), and the share of the step
spent in attention, GEMMs, fused ops, optimizer and EMA from `--profile-steps` steps under
torch.profiler (bench/_trace.py). The JSON is rewritten after every path.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from bench._harness import environment, module_main, write_json


@dataclass(frozen=True)
class PathSpec:
    """How one path builds the step. The reference paths keep torch's optimizer (fused
    AdamW plus foreach EMA updates), so "eager" is all-torch; the kernel paths take
    run.fused_optimizer="auto" (the one-pass Triton optimizer on CUDA)."""

    use_kernels: bool
    compiled: bool | str  # True/False, or "auto"/"on"/"off" as run.compile takes it
    fused_optimizer: str = "off"
    cuda_graphs: bool = False
    precision: str = "auto"  # run.precision: "auto" (bf16 on CUDA, measured on CPU)


PATH_SPECS = {
    "eager": PathSpec(False, False),
    "compile": PathSpec(False, True),
    "kernels": PathSpec(True, False, "auto"),
    "kernels+compile": PathSpec(True, True, "auto"),
    # Opt-in variants, to measure one change at a time against "kernels":
    "kernels+torch-optim": PathSpec(True, False, "off"),  # without the one-pass optimizer
    "kernels+graphs": PathSpec(True, False, "off", cuda_graphs=True),  # CUDA only
    # CPU: today's old default, then one change at a time, then what "auto" picks.
    "fp32-eager": PathSpec(False, False, precision="fp32"),
    "bf16-eager": PathSpec(False, False, precision="bf16"),
    "bf16-compile": PathSpec(False, True, precision="bf16"),
    "auto": PathSpec(False, "auto"),
}
PATHS = tuple(PATH_SPECS)
DEFAULT_PATHS = ("eager", "compile", "kernels", "kernels+compile")
CPU_DEFAULT_PATHS = ("fp32-eager", "bf16-eager", "bf16-compile", "auto")
# A long run, for the "auto" path's compile decision.
LONG_RUN_STEPS = 400_000
# Dense bf16 tensor-core peaks from the datasheets (SXM parts), in TFLOP/s.
DATASHEET_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}


def datasheet_peak(device_name: str) -> float | None:
    return next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in device_name), None)


@dataclass
class Rig:
    """A built training step and the batch it runs on."""

    net: torch.nn.Module
    step_fn: Any  # train.step.TrainStep
    x: torch.Tensor
    y: torch.Tensor
    device: torch.device
    kernels_backend: str
    schedule: Any  # train.schedule.Schedule, the loop's
    execution: Any = None  # train.execution.ExecutionPlan: precision, compile, threads

    def values(self, i: int) -> Any:
        """Step i's train.schedule.StepValues: the loss inputs the loop's schedule gives at
        step i of a long run, with a fixed lr, teacher momentum and EMA decay."""
        from train.schedule import StepValues

        return StepValues(lr=1e-4, ema_beta=0.9999, teacher_momentum=0.996,
                          loss=self.schedule.loss_inputs(i, 1_000_000))

    def run(self, i: int) -> torch.Tensor:
        return self.step_fn(self.x, self.y, self.values(i))

    def update_description(self) -> dict[str, Any]:
        """Which optimizer and EMA updates ran, and whether the step was a CUDA graph."""
        from train.graphs import GraphedStep

        graphed = isinstance(self.step_fn, GraphedStep)
        inner = self.step_fn.step if graphed else self.step_fn
        if inner.fused:
            optimizer = "one-pass Triton AdamW + teacher momentum + sampling EMA"
        else:
            flavour = "fused" if inner.optimizer.defaults.get("fused") else "foreach"
            optimizer = f"torch AdamW ({flavour}) + foreach teacher and EMA updates"
        return {"optimizer": optimizer, "cuda_graphs": graphed}


def build_rig(name: str, path: str | PathSpec, batch: int, device: torch.device, seed: int = 0,
              overrides: dict[str, Any] | None = None,
              planned_steps: int = LONG_RUN_STEPS) -> Rig:
    """The loop's own set-up (`train.loop.set_up`: sampling EMA, wrappers, threads,
    precision, compile, optimizer, TrainStep, autocast) for `name`, with the model built on
    `device` and a device-resident batch of its shape. `path` names a PATH_SPECS entry or
    is a PathSpec; "auto" settings decide as for a run of `planned_steps` steps."""
    import model
    from sdkernels._runtime import current_backend
    from train import distributed as D
    from train.config import Config, compile_mode
    from train.graphs import check_cuda_graphs
    from train.loop import set_up

    spec = PATH_SPECS[path] if isinstance(path, str) else path
    use_kernels, compiled = spec.use_kernels, spec.compiled
    cfg = Config()
    cfg.model.name, cfg.schedule.batch_size, cfg.run.seed = name, batch, seed
    cfg.run.device = device.type
    cfg.run.compile = compile_mode(compiled)  # True/False or "auto"/"on"/"off"
    cfg.run.precision = spec.precision
    cfg.run.use_kernels = "on" if use_kernels else "off"
    cfg.run.fused_optimizer, cfg.run.cuda_graphs = spec.fused_optimizer, spec.cuda_graphs
    check_cuda_graphs(cfg, device, 1)
    cfg.run.dir = tempfile.mkdtemp(prefix="sddit-bench-step-")  # the loop's metrics file
    cfg.run.tensorboard = cfg.run.progress_bar = False
    if compiled:
        torch._dynamo.reset()  # no guards or caches carried over from another path
    torch.manual_seed(seed)
    with device:
        net = model.build(name, use_kernels=use_kernels, **(overrides or {})).to(device)
    batches = batch_source(net, batch, device, seed)
    info = D.DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    session = set_up(cfg, info, net, batches, [], planned_steps=planned_steps)
    session.logger.close()
    shutil.rmtree(cfg.run.dir, ignore_errors=True)
    x, y = next(iter(batches))
    backend = current_backend(x) if use_kernels else "none"
    if backend == "triton" and device.type == "cpu":
        backend = "triton (interpreter)"
    return Rig(net, session.step_fn, x, y, device, backend, session.schedule,
               session.execution)


def batch_source(net: torch.nn.Module, batch: int, device: torch.device, seed: int,
                 num_batches: int = 1):
    """train.data's TensorBatches (the in-memory data path, shuffle and flips included)
    over `num_batches` batches of random samples of the model's input shape, on device."""
    from train.data import EpochSampler, TensorBatches

    c, n = net.config, num_batches * batch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c.in_channels, c.input_size, c.input_size, generator=g)
    y = torch.randint(0, c.num_classes, (n,), generator=g)
    return TensorBatches(x, y, EpochSampler(n, batch, seed=seed), c.num_classes, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(rig: Rig, warmup: int, steps: int) -> tuple[list[float], float, float]:
    """(per-step milliseconds, wall seconds of the whole timed loop, seconds of the first
    step: a compiled path's compilation)."""
    t0 = time.perf_counter()
    rig.run(0)
    _sync(rig.device)
    first_s = time.perf_counter() - t0
    for i in range(1, warmup):
        rig.run(i)
    _sync(rig.device)
    if rig.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rig.device)
        marks = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                 for _ in range(steps)]
        t0 = time.perf_counter()
        for i, (start, end) in enumerate(marks):
            start.record()
            rig.run(warmup + i)
            end.record()
        _sync(rig.device)
        wall = time.perf_counter() - t0
        return [s.elapsed_time(e) for s, e in marks], wall, first_s
    times = []
    t0 = time.perf_counter()
    for i in range(steps):
        t = time.perf_counter()
        rig.run(warmup + i)
        times.append((time.perf_counter() - t) * 1e3)
    return times, time.perf_counter() - t0, first_s


def profile_shares(rig: Rig, steps: int, start: int) -> dict[str, Any]:
    """Attention / GEMM / fused / optimizer / EMA shares of `steps` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    from bench._trace import breakdown

    cuda = rig.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            rig.run(start + i)
        _sync(rig.device)
    return breakdown(list(prof.events()), steps, cuda).to_dict()


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, n: int,
                           reps: int = 10) -> float:
    """A large square matmul in `dtype`, median of `reps` (CUDA events on a GPU): the
    practical peak that MFU is also reported against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        else:
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e12


def measured_peaks(device: torch.device, env: dict[str, Any]) -> dict[str, float | None]:
    """The datasheet bf16 peak (CUDA) and a large matmul measured here in fp32 and bf16,
    so each row's MFU is against the peak of its own compute dtype."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 2048
    peaks: dict[str, float | None] = {
        "datasheet": datasheet_peak(env.get("device", "")) if cuda else None,
        "matmul_fp32": measured_matmul_tflops(device, torch.float32, n)}
    try:
        peaks["matmul_bf16"] = measured_matmul_tflops(device, torch.bfloat16, n)
    except RuntimeError:  # no bf16 matmul on this device
        peaks["matmul_bf16"] = None
    return peaks


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarise(name: str, path: str, batch: int, times_ms: list[float], wall_s: float,
              flops_img: float, peaks: dict[str, float | None]) -> dict[str, Any]:
    """The per-path row: throughput, spread and MFU against each peak in `peaks`."""
    median = statistics.median(times_ms)
    images_per_s = batch * len(times_ms) / wall_s
    achieved = flops_img * images_per_s / 1e12
    row: dict[str, Any] = {
        "model": name, "path": path, "batch": batch, "timed_steps": len(times_ms),
        "median_step_ms": median, "p10_step_ms": _percentile(times_ms, 0.1),
        "p90_step_ms": _percentile(times_ms, 0.9), "min_step_ms": min(times_ms),
        "max_step_ms": max(times_ms),
        "spread_pct": 100 * (_percentile(times_ms, 0.9) - _percentile(times_ms, 0.1)) / median,
        "steps_per_s": len(times_ms) / wall_s, "images_per_s": images_per_s,
        "steps_per_s_median": 1e3 / median, "train_gflops_per_image": flops_img / 1e9,
        "achieved_tflops": achieved,
    }
    for key, peak in peaks.items():
        row[f"mfu_{key}"] = achieved / peak if peak else None
    return row


def bench_path(args: argparse.Namespace, path: str, device: torch.device,
               peaks: dict[str, float | None]) -> dict[str, Any]:
    import model

    overrides = {"patch_size": args.patch_size} if args.patch_size else None
    rig = build_rig(args.model, path, args.batch, device, args.seed, overrides)
    times_ms, wall, first_s = time_steps(rig, args.warmup, args.steps)
    dtype = "bf16" if rig.execution.precision.name == "bf16" else "fp32"
    own = {"datasheet": peaks["datasheet"], "measured_matmul": peaks[f"matmul_{dtype}"]}
    row = summarise(args.model, path, args.batch, times_ms, wall,
                    model.flops_per_image(rig.net, train=True), own)
    row.update({"compute_dtype": dtype, "compiled": rig.execution.compile.on,
                "first_step_s": first_s, "execution": rig.execution.record()})
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:  # ru_maxrss is KiB on Linux: the whole process so far, not this path alone
        row["peak_rss_gib_process"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    row["attention_backend"] = rig.net.attention_backend
    row["kernels_backend"] = rig.kernels_backend
    row.update(rig.update_description())
    if args.profile_steps:
        row["profile"] = profile_shares(rig, args.profile_steps, args.warmup + args.steps)
    del rig
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def measured_attention_choices() -> list[dict[str, Any]]:
    """Every `attention="auto"` decision timed so far in this process (CUDA only: B, T,
    heads, head dim, dtype), with each candidate's milliseconds, so the JSON shows what
    flash, cuDNN and the others cost at the step's shapes, not only which one won."""
    from model.attention import attention_choices

    return [{**{k: v for k, v in c.key._asdict().items() if k != "device"},
             "backend": c.backend,
             "timings_ms": {k: (None if v == float("inf") else v)
                            for k, v in c.timings_ms.items()}}
            for c in attention_choices()]


def _print_attention_choices(choices: list[dict[str, Any]]) -> None:
    for choice in choices:
        times = "  ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a"
                          for k, v in choice["timings_ms"].items())
        print(f"  attention auto at B={choice['batch']} T={choice['tokens']} "
              f"H={choice['heads']} Dh={choice['head_dim']}: {choice['backend']}  "
              f"[ms, fwd+bwd: {times}]", flush=True)


def method_table(name: str) -> list[dict[str, Any]]:
    """model.flops.method_table at `name`'s size: parameters, teacher parameters and
    training / inference GFLOPs per image of every method."""
    from model import METHODS
    from model.flops import method_table as table

    method = next(m for m in sorted(METHODS, key=len, reverse=True)
                  if name.startswith(f"{m}-"))
    return table(sizes=(name[len(method) + 1:],))


def add_step_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="preset (default: SD-DiT-XL/2 on CUDA, SD-DiT-tiny on CPU)")
    p.add_argument("--batch", type=int, default=None, help="default: 32 on CUDA, 8 on CPU")
    p.add_argument("--patch-size", type=int, default=None,
                   help="override the preset's patch size (the CPU demo trains at 4)")
    p.add_argument("--paths", default=None,
                   help=f"comma list of {', '.join(PATHS)} (default: "
                   f"{','.join(DEFAULT_PATHS)} on CUDA; {','.join(CPU_DEFAULT_PATHS)} on "
                   "CPU, where the kernels fall back to their references; kernels+graphs "
                   "needs CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 50 CUDA, 20 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10/3)")
    p.add_argument("--profile-steps", type=int, default=3,
                   help="steps profiled for the time shares (0 skips the profile)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpu-only", action="store_true",
                   help="without CUDA, say 'no GPU', write that and exit 0 (device check)")
    p.add_argument("--out", default="bench-out/step.json")


def _resolve(args: argparse.Namespace) -> tuple[torch.device, list[str]]:
    """Fills the device-dependent defaults; rejects bad arguments before any work."""
    from train.distributed import resolve_device

    try:
        device = resolve_device(args.device, what="--device")
    except RuntimeError as exc:  # cuda asked for, none here
        raise ValueError(str(exc)) from None
    cuda = device.type == "cuda"
    args.model = args.model or ("SD-DiT-XL/2" if cuda else "SD-DiT-tiny")
    args.batch = args.batch or (32 if cuda else 8)
    args.steps = args.steps or (50 if cuda else 20)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 3)
    default = ",".join(DEFAULT_PATHS if cuda else CPU_DEFAULT_PATHS)
    paths = [p for p in (args.paths or default).split(",") if p]
    unknown = [p for p in paths if p not in PATHS]
    if unknown or not paths:
        raise ValueError(f"--paths: unknown {unknown}; choose from {', '.join(PATHS)}")
    if not cuda and any(PATH_SPECS[p].cuda_graphs for p in paths):
        raise ValueError("--paths kernels+graphs: CUDA graphs need a CUDA device")
    for key in ("batch", "steps"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.patch_size is not None and args.patch_size < 1:
        raise ValueError(f"--patch-size must be >= 1, got {args.patch_size}")
    if args.warmup < 0 or args.profile_steps < 0:
        raise ValueError("--warmup and --profile-steps must be >= 0")
    if not cuda and not args.model.endswith("-tiny"):
        raise ValueError(f"--model {args.model}: on CPU only the *-tiny presets run (one "
                         "XL step takes minutes there); use a GPU for the full presets")
    import model

    overrides = {"patch_size": args.patch_size} if args.patch_size else {}
    model.make_config(args.model, **overrides)  # a bad preset or patch fails here, first
    return device, sorted(paths, key=lambda p: (_compiles(p), PATHS.index(p)))


def _compiles(path: str) -> bool:
    return PATH_SPECS[path].compiled is not False


def _print_row(row: dict[str, Any], label: str) -> None:
    if "error" in row:
        print(f"  {row['path']:<16} FAILED: {row['error']}", flush=True)
        return
    mfu = row.get("mfu_datasheet") or row.get("mfu_measured_matmul")
    mem = row.get("peak_memory_gib", row.get("peak_rss_gib_process"))
    against = "datasheet" if row.get("mfu_datasheet") else f"{row['compute_dtype']} matmul"
    print(f"  {label} {row['path']:<16}{row['median_step_ms']:9.2f} ms "
          f"(p10 {row['p10_step_ms']:.2f}, p90 {row['p90_step_ms']:.2f}) "
          f"{row['steps_per_s']:7.2f} steps/s {row['images_per_s']:9.1f} img/s "
          f"{row['achieved_tflops']:8.3f} TFLOP/s"
          + (f"  MFU {100 * mfu:.1f}% of {against}" if mfu else "")
          + f"  mem {mem:.2f} GiB  first step {row['first_step_s']:.1f} s", flush=True)
    if "profile" in row:
        shares = "  ".join(f"{k} {100 * v:.0f}%" for k, v in row["profile"]["shares"].items())
        print(f"      time shares: {shares}", flush=True)


def _print_methods(rows: list[dict[str, Any]]) -> None:
    from model.flops import format_method_table

    print(format_method_table(rows))


def run_step(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if args.gpu_only and not torch.cuda.is_available():
        print("sddit bench step: no GPU (no CUDA device); nothing timed.")
        write_json(args.out, {"env": environment(), "status": "no GPU", "results": []})
        return 0
    try:
        device, paths = _resolve(args)
    except ValueError as exc:
        print(f"sddit bench step: {exc}", file=sys.stderr)
        return 2
    cuda = device.type == "cuda"
    env = environment()
    label = env.get("device", "GPU") if cuda else "CPU"
    methods = method_table(args.model)
    _print_methods(methods)
    peaks = measured_peaks(device, env)
    payload: dict[str, Any] = {
        "env": env, "label": label if cuda else "CPU (tiny preset; not GPU numbers)",
        "model": args.model, "batch": args.batch, "patch_size": args.patch_size,
        "paths": paths, "datasheet_bf16_tflops": peaks["datasheet"],
        "measured_matmul_tflops": peaks["matmul_bf16" if cuda else "matmul_fp32"],
        "matmul_dtype": "torch.bfloat16" if cuda else "torch.float32",
        "measured_matmul_tflops_by_dtype": {"fp32": peaks["matmul_fp32"],
                                            "bf16": peaks["matmul_bf16"]},
        "methods": methods, "results": [], "status": "running"}
    print(f"{label}: {args.model} batch {args.batch}, 1 + {max(args.warmup - 1, 0)} warm-up "
          f"+ {args.steps} timed steps per path; matmul fp32 {peaks['matmul_fp32']:.3f}, "
          f"bf16 {peaks['matmul_bf16'] or float('nan'):.3f} TFLOP/s")
    write_json(args.out, payload)
    for path in tqdm(paths, desc="bench step", unit="path", disable=None):
        try:
            row = bench_path(args, path, device, peaks)
        except Exception as exc:  # one failing path must not hide the others
            row = {"path": path, "error": f"{type(exc).__name__}: {exc}"}
        payload["results"].append(row)
        write_json(args.out, payload)
        _print_row(row, label)
    payload["attention_choices"] = measured_attention_choices()
    _print_attention_choices(payload["attention_choices"])
    payload["status"] = "complete"
    write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0 if all("error" not in r for r in payload["results"]) else 1


def main(argv: list[str] | None = None) -> int:
    return module_main("python -m bench.step", __doc__, add_step_arguments, run_step, argv)


if __name__ == "__main__":
    sys.exit(main())
