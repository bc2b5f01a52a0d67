"""Training-step throughput: steps/s, images/s, achieved TFLOP/s, MFU and peak memory.

    python -m bench.train_step --model SD-DiT-XL/2 --batch 32 [--variants kernels,reference,compile]

Method: synthetic latents ([B, 4, 32, 32] for the ImageNet-256 presets) and labels, bf16
autocast on CUDA, fused AdamW; each variant warms up, then `--steps` full steps
(forward, backward, optimizer, teacher momentum) are timed with CUDA events and the median
is taken. FLOPs per image are analytic (`model.flops_per_image(net, train=True)`: masked
student forward + 2x for backward, teacher forward only). MFU is reported against the
datasheet bf16 peak and against a large bf16 matmul measured in the same run.
Variants: `kernels` (sdkernels fused ops), `reference` (plain torch), `compile`
(torch.compile of the plain-torch model: the strongest practical alternative).
Without CUDA it says so and exits 0, unless `--device cpu` asks for a (slow) CPU run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import model
from bench._harness import environment, write_json

# Dense bf16 tensor-core peaks from the datasheets (SXM parts), in TFLOP/s.
DATASHEET_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}


def datasheet_peak(device_name: str) -> float | None:
    return next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in device_name), None)


def measured_matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return 2 * n**3 / (statistics.median(times) * 1e-3) / 1e12


def make_step(net: torch.nn.Module, loss_fn: Callable[..., dict], opt: torch.optim.Optimizer,
              device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            loss = loss_fn(x0, y)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        net.update_teacher(0.996)
        return loss.detach()

    return step


def time_variant(name: str, variant: str, batch: int, steps: int, warmup: int,
                 device: torch.device) -> dict[str, Any]:
    net = model.build(name, use_kernels=variant == "kernels").to(device)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    loss_fn = net.training_losses
    if variant == "compile":
        loss_fn = torch.compile(net.training_losses)
    step = make_step(net, loss_fn, opt, device)
    cfg = net.config
    x0 = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    y = torch.randint(0, cfg.num_classes, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step(x0, y)
    times_ms = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            step(x0, y)
            end.record()
            torch.cuda.synchronize()
            times_ms.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step(x0, y)
            times_ms.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times_ms)
    flops_img = model.flops_per_image(net, train=True)
    row = {
        "model": name, "variant": variant, "batch": batch, "median_step_ms": ms,
        "steps_per_s": 1e3 / ms, "images_per_s": batch * 1e3 / ms,
        "train_gflops_per_image": flops_img / 1e9,
        "achieved_tflops": flops_img * batch / (ms * 1e-3) / 1e12,
        "attention_backend": net.attention_backend,
    }
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default="SD-DiT-XL/2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--variants", default="kernels,reference,compile")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--out", default="bench-out/train_step.json")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - {"kernels", "reference", "compile"}
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; use kernels, reference, compile")
    if args.device is None and not torch.cuda.is_available():
        print("bench.train_step: no CUDA device; pass --device cpu for a slow CPU run.")
        return 0
    device = torch.device(args.device or "cuda")
    env = environment()
    peak = datasheet_peak(env.get("device", ""))
    matmul = measured_matmul_tflops() if device.type == "cuda" else None
    rows = []
    for variant in variants:
        try:
            row = time_variant(args.model, variant, args.batch, args.steps, args.warmup, device)
        except Exception as exc:  # report every variant
            print(f"{variant}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append({"variant": variant, "error": repr(exc)})
            continue
        if peak:
            row["mfu_datasheet"] = row["achieved_tflops"] / peak
        if matmul:
            row["mfu_measured_matmul"] = row["achieved_tflops"] / matmul
        rows.append(row)
        print(f"{args.model} {variant:<10} {row['median_step_ms']:9.2f} ms/step "
              f"{row['images_per_s']:9.1f} img/s {row['achieved_tflops']:7.1f} TFLOP/s"
              + (f"  MFU {100 * row['mfu_datasheet']:.1f}% of datasheet" if peak else ""))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_json(args.out, {"env": env, "datasheet_bf16_tflops": peak,
                          "measured_matmul_tflops": matmul, "results": rows})
    print(f"wrote {args.out}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
