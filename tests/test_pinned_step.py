"""One training step of each method, pinned to the values the code gave before the issue-20
redesign (tests/pinned/step_values.json), so that a restructuring that changes numbers
fails here.

Each case builds a micro network with a fixed seed, moves it off its (partly zero) init,
draws a fixed batch and runs one loss forward and backward in fp32 on CPU. Pinned: every
loss part, and for every trainable parameter its gradient's norm, sum, largest magnitude
and first two entries; SD-DiT's centre after the step and its teacher after an update;
the next number the global generator draws (so a change in what the step draws, or in
what order, shows). The kernel path (Triton, through the interpreter on CPU) is held to
the same values with the kernel tests' model tolerance, and the fused kernel calls one
step launches are counted per op.

`python tests/test_pinned_step.py --record` rewrites the file: only for a change that is
meant to alter the numbers, said so in its commit.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from numerics import model_batch, perturb_  # noqa: E402

import model  # noqa: E402

PINNED = os.path.join(os.path.dirname(__file__), "pinned", "step_values.json")
MICRO = dict(input_size=8, in_channels=2, num_classes=5, hidden_size=64, depth=3, num_heads=2,
             head_hidden_dim=32, head_bottleneck_dim=16, n_prototypes=24)
CASES: dict[str, tuple[str, dict]] = {
    "SD-DiT": ("SD-DiT-tiny", dict(MICRO, decoder_depth=1, mask_ratio=0.25)),
    "SD-DiT-logu-kept": ("SD-DiT-tiny", dict(MICRO, decoder_depth=1, mask_ratio=0.25,
                                             teacher_sigma="logu:0.002:0.05",
                                             center_tokens="kept")),
    "DiT": ("DiT-tiny", dict(MICRO)),
    "MaskDiT": ("MaskDiT-tiny", dict(MICRO, decoder_depth=1, decoder_width=32,
                                     decoder_num_heads=2)),
    "MDT": ("MDT-tiny", dict(input_size=8, in_channels=2, num_classes=5, hidden_size=64,
                             depth=4, num_heads=2, decoder_depth=2)),
}
# SD-DiT's teacher temperature part-way through its warm-up: step 5 of 100 (tau_t 0.055),
# as the training schedule hands it to the loss.
WARMUP_STEP, PLANNED_STEPS = 5, 100
TEACHER_MOMENTUM = 0.9


def build(case: str, use_kernels: bool = False) -> torch.nn.Module:
    name, overrides = CASES[case]
    torch.manual_seed(0)
    net = model.build(name, use_kernels=use_kernels, **overrides)
    perturb_(net, 0.05, seed=1)  # every parameter carries signal, teacher included
    return net


def run_step(net: torch.nn.Module) -> dict:
    """One loss forward and backward under seed 3, the digest of what it gave."""
    from train.config import EMAConfig, OptimConfig
    from train.schedule import Schedule

    x0, y = model_batch(net, 3, seed=2)
    schedule = Schedule(OptimConfig(), EMAConfig(), 3, net.config)
    torch.manual_seed(3)
    losses = net.training_losses(x0, y, schedule.loss_inputs(WARMUP_STEP, PLANNED_STEPS))
    losses["loss"].backward()
    out = {"losses": {k: float(v.detach()) for k, v in sorted(losses.items())},
           "next_draw": float(torch.rand(())), "grads": {}}
    for name, p in net.named_parameters():
        if p.requires_grad:
            g = p.grad.double()
            out["grads"][name] = {"norm": float(g.norm()), "sum": float(g.sum()),
                                  "absmax": float(g.abs().max()),
                                  "first": [float(v) for v in g.flatten()[:2]]}
    teacher = getattr(net.method, "teacher", None)  # SD-DiT's
    if teacher is not None:
        out["center"] = [float(v) for v in net.method.center.double()]
        net.update_teacher(TEACHER_MOMENTUM)
        out["teacher_sum"] = float(sum(p.double().sum() for p in teacher.parameters()))
    return out


def count_fused_calls(net: torch.nn.Module) -> dict[str, int]:
    """Eager sdkernels launcher calls of one step (forward and backward), by op."""
    from sdkernels._ops import record_calls

    x0, y = model_batch(net, 3, seed=2)
    torch.manual_seed(3)
    with record_calls() as calls:
        net.training_losses(x0, y)["loss"].backward()
    return dict(sorted(Counter(c.name for c in calls).items()))


def close(actual: float, expected: float, rtol: float, scale: float = 0.0) -> bool:
    return math.isclose(actual, expected, rel_tol=rtol, abs_tol=rtol * scale + 1e-12)


def assert_matches_pin(got: dict, pin: dict, rtol: float) -> None:
    """Losses and per-parameter digests within rtol (sums and entries relative to the
    gradient's size, since they can cancel); the next draw exactly."""
    assert got["losses"].keys() == pin["losses"].keys()
    for name, value in pin["losses"].items():
        assert close(got["losses"][name], value, rtol), (name, got["losses"][name], value)
    assert got["next_draw"] == pin["next_draw"], "the step draws other random numbers"
    assert got["grads"].keys() == pin["grads"].keys()
    for name, want in pin["grads"].items():
        have, size = got["grads"][name], want["norm"]
        assert close(have["norm"], size, rtol), (name, have["norm"], size)
        assert close(have["absmax"], want["absmax"], rtol, size), (name, "absmax")
        assert close(have["sum"], want["sum"], rtol, size * 4), (name, have["sum"], want["sum"])
        for a, b in zip(have["first"], want["first"], strict=True):
            assert close(a, b, rtol, size), (name, "first entries", a, b)
    for key in ("center", "teacher_sum"):
        assert (key in got) == (key in pin), key
    if "center" in pin:
        scale = max(abs(v) for v in pin["center"])
        for a, b in zip(got["center"], pin["center"], strict=True):
            assert close(a, b, rtol, scale), ("center", a, b)
        assert close(got["teacher_sum"], pin["teacher_sum"], rtol), "teacher_sum"


def pinned() -> dict:
    """The pins, their parameter names renamed as an old checkpoint's keys are (they were
    recorded before the methods became loss objects: `head.*` is now `method.head.*`)."""
    from model.network import upgrade_state_dict

    with open(PINNED) as f:
        values = json.load(f)
    for case in values.values():
        upgrade_state_dict(case["reference"]["grads"])
    return values


@pytest.mark.parametrize("case", list(CASES))
def test_reference_step_gives_the_pinned_values(case: str) -> None:
    assert_matches_pin(run_step(build(case)), pinned()[case]["reference"], rtol=2e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_step_gives_the_pinned_values_and_fused_call_counts(case: str) -> None:
    import sdkernels

    net = build(case, use_kernels=True)
    assert sdkernels.current_backend(torch.zeros(1)) == "triton"
    assert_matches_pin(run_step(net), pinned()[case]["reference"], rtol=1e-4)
    assert count_fused_calls(build(case, use_kernels=True)) == pinned()[case]["fused_calls"]


def record() -> None:
    values = {case: {"reference": run_step(build(case)),
                     "fused_calls": count_fused_calls(build(case, use_kernels=True))}
              for case in CASES}
    os.makedirs(os.path.dirname(PINNED), exist_ok=True)
    with open(PINNED, "w") as f:
        json.dump(values, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_pinned_step.py --record")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    record()
