"""Timing and bandwidth helpers for the kernel benchmarks (CUDA only).

Method: CUDA events around each call, L2 flushed before every timed call by writing a
buffer larger than L2 (so no input is served from cache), median of `reps` runs after
`warmup` runs. Achieved GB/s = minimal bytes moved (each input read once, each output
written once) / median time. The ceiling is a device-to-device copy of a large buffer,
measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Inputs = dict[str, Any]


@dataclass(frozen=True)
class KernelCase:
    """One op at one shape. `make_inputs(device)` returns fresh inputs (tensors that need
    gradients already have requires_grad set); `triton`/`reference` take **inputs and
    return a tensor or a tuple of tensors. Byte counts are the minimal traffic."""

    op: str
    shape: str
    make_inputs: Callable[[torch.device], Inputs]
    triton: Callable[..., Any]
    reference: Callable[..., Any]
    bytes_fwd: int
    bytes_bwd: int


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _flush_buffer(device: torch.device) -> torch.Tensor:
    return torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)


def cuda_median_ms(fn: Callable[[], Any], warmup: int = 10, reps: int = 100) -> float:
    flush = _flush_buffer(torch.device("cuda"))
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def copy_bandwidth_gbs(size_bytes: int = 1 << 30) -> float:
    """Device-to-device copy: reads and writes `size_bytes` each."""
    src = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), warmup=5, reps=30)
    return 2 * size_bytes / (ms * 1e-3) / 1e9


def _outputs(result: Any) -> list[torch.Tensor]:
    items = result if isinstance(result, tuple | list) else (result,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]


def forward_fn(fn: Callable[..., Any], inputs: Inputs) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return fn(**inputs)

    return run


def backward_fn(fn: Callable[..., Any], inputs: Inputs) -> Callable[[], Any]:
    """Times only the backward: the graph is built once and replayed with retain_graph."""
    outs = _outputs(fn(**inputs))
    grads = [torch.randn_like(o) for o in outs]
    leaves = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]

    def run() -> Any:
        return torch.autograd.grad(outs, leaves, grads, retain_graph=True)

    return run


def git_commit() -> str:
    """SDDIT_COMMIT when set (a tree copied without .git, as on the lent GPU), else git's
    HEAD, else "unknown"."""
    if os.environ.get("SDDIT_COMMIT"):
        return os.environ["SDDIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["device"] = props.name
        info["capability"] = f"{props.major}.{props.minor}"
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        info["device"] = "cpu"
    info["cpu"] = cpu_description()
    return info


# The CPU flags that decide matmul speed per dtype: AMX tiles (Intel Sapphire Rapids and
# later: bf16 at 7-8x fp32 measured here), AVX512-BF16 dot products (about 2x), AVX-512.
MATRIX_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_fp16",
                "avx512f", "avx2")


def cpu_description() -> dict[str, Any]:
    """The host CPU: model name, cores, torch's intra-op threads, its ISA level and which
    of MATRIX_FLAGS /proc/cpuinfo lists (empty where there is no /proc/cpuinfo)."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"model": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(),
            "matrix_flags": [f for f in MATRIX_FLAGS if f in flags]}


def write_json(path: str, payload: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def module_main(prog: str, doc: str | None,
                add_arguments: Callable[[argparse.ArgumentParser], None],
                run: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """`python -m bench.<name>`: the same arguments and run function as its `sddit`
    subcommand, with the module docstring as help."""
    parser = argparse.ArgumentParser(prog=prog, description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
