"""The optimizer pass at SD-DiT-XL/2 tensor shapes: AdamW + teacher momentum update +
sampling EMA (+ the teacher's bf16 shadow), fused (`sdkernels.optim`) against the path
training takes without it: torch.optim.AdamW(fused=True), then `_foreach_mul_` +
`_foreach_add_` for the teacher, `_foreach_lerp_` for the EMA, and the bf16 cast of the
teacher weights that autocast makes on the teacher's forward.

The tensors are those of `N_BLOCKS` DiT-XL blocks (D = 1152, MLP 4608, adaLN 6 x D; all
of an encoder block's tensors have a teacher and an EMA partner), enough to reach the
bandwidth regime while fitting any 40 GB card; bytes scale linearly to the full net.

Minimal bytes per parameter element (fp32 states, bf16 shadow):
    fused:    read p, g, m, v, teacher, ema; write p, m, v, teacher, ema, shadow = 46 B
    baseline: AdamW 28 B (4 reads, 3 writes) + teacher mul 8 B + add 12 B + EMA lerp
              12 B + the teacher's bf16 cast 6 B = 66 B
`bytes_fwd` is the fused minimum; an optimizer step has no backward (`bytes_bwd` = 0:
the harness must skip that direction for this family).
"""

from __future__ import annotations

import torch

from bench._harness import Inputs, KernelCase
from sdkernels import optim as kernels

D, MLP = 1152, 4 * 1152
N_BLOCKS = 4
HYPER = kernels.StepScalars(lr=1e-4, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                            teacher_momentum=0.996, ema_beta=0.9999)
FUSED_BYTES_PER_ELEMENT = 6 * 4 + 5 * 4 + 2  # 46
BASELINE_BYTES_PER_ELEMENT = 28 + 8 + 12 + 12 + 6  # 66


def block_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of one DiT block: attention, MLP, adaLN modulation."""
    return [(3 * D, D), (3 * D,), (D, D), (D,), (MLP, D), (MLP,), (D, MLP), (D,),
            (6 * D, D), (6 * D,)]


def _make_inputs(device: torch.device) -> Inputs:
    shapes = block_shapes() * N_BLOCKS
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    sets = [dict(param=p.detach(), grad=p.grad, exp_avg=torch.zeros_like(p),
                 exp_avg_sq=torch.zeros_like(p), teacher=p.detach().clone(),
                 ema=p.detach().clone(), shadow=p.detach().to(torch.bfloat16)) for p in params]
    adamw = torch.optim.AdamW(params, lr=HYPER.lr, betas=(HYPER.beta1, HYPER.beta2),
                              eps=HYPER.eps, weight_decay=HYPER.weight_decay,
                              fused=device.type == "cuda")
    return {"sets": sets, "steps": torch.zeros(len(sets), device=device),
            "table": kernels.build_table(sets) if device.type == "cuda" else None,
            "adamw": adamw, "params": params}


def fused_step(sets, steps, table, adamw, params) -> None:
    kernels.adamw_ema_step(table, steps, HYPER)


def baseline_step(sets, steps, table, adamw, params) -> None:
    """Today's unfused path: AdamW's fused CUDA kernel, then the two averages."""
    adamw.step()
    teachers = [s["teacher"] for s in sets]
    live = [s["param"] for s in sets]
    torch._foreach_mul_(teachers, HYPER.teacher_momentum)
    torch._foreach_add_(teachers, live, alpha=1.0 - HYPER.teacher_momentum)
    torch._foreach_lerp_([s["ema"] for s in sets], live, 1.0 - HYPER.ema_beta)
    for s in sets:  # what autocast does to each teacher weight on the teacher's forward
        s["shadow"].copy_(s["teacher"])


def _case() -> KernelCase:
    numel = sum(torch.Size(s).numel() for s in block_shapes()) * N_BLOCKS
    return KernelCase(op="adamw_ema", shape=f"{N_BLOCKS} XL blocks {numel / 1e6:.0f}M fp32",
                      make_inputs=_make_inputs, triton=fused_step, reference=baseline_step,
                      bytes_fwd=FUSED_BYTES_PER_ELEMENT * numel, bytes_bwd=0)


CASES: list[KernelCase] = [_case()]
