"""attention="auto" on CUDA times the candidates once per shape and keeps the fastest.

No GPU here, so the mechanism is tested with an injected timer (and with `can_time`
forced): the right candidates are timed, the fastest wins, the decision is cached per
shape and reported, a failing candidate is never chosen, and where timing cannot run the
static order (or an earlier measurement) decides.
"""

from __future__ import annotations

import time

import pytest
import torch

from model import attention as A


def _qkv(B: int = 2, T: int = 7, H: int = 3, Dh: int = 8, grad: bool = False):
    return [torch.randn(B, T, H, Dh, requires_grad=grad) for _ in range(3)]


class _FakeTimes:
    """A timer that runs the candidate once and charges it a fixed time by name."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, ms: dict[str, float]) -> None:
        self.ms, self.timed, self.last = ms, [], None
        for name in ms:
            def fake(q, k, v, name=name):
                self.last = name
                if self.ms[name] == float("inf"):
                    raise RuntimeError(f"{name}: no kernel for this input")
                return A._math(q, k, v)

            monkeypatch.setitem(A.BACKENDS, name, fake)

    def __call__(self, fn) -> float:
        fn()
        self.timed.append(self.last)
        return self.ms[self.last]


def test_fastest_candidate_wins_and_is_cached_per_shape(monkeypatch) -> None:
    times = _FakeTimes(monkeypatch, {"sdpa_flash": 2.0, "sdpa_cudnn": 1.0,
                                     "sdpa_efficient": 3.0})
    chooser = A.BackendChooser(timer=times)
    q, k, v = _qkv(grad=True)
    got = A.choose_auto(q, k, v, ("sdpa", "math"), chooser, can_time=True)
    assert got == "sdpa_cudnn"
    assert times.timed == ["sdpa_flash", "sdpa_cudnn", "sdpa_efficient"]  # math not timed
    assert A.choose_auto(q, k, v, ("sdpa", "math"), chooser, can_time=True) == "sdpa_cudnn"
    assert len(times.timed) == 3, "a cached shape must not be timed again"
    (choice,) = chooser.choices.values()
    assert choice.backend == "sdpa_cudnn" and choice.timings_ms["sdpa_flash"] == 2.0
    assert choice.key == (2, 7, 3, 8, "torch.float32", "cpu", True)
    q2, k2, v2 = _qkv(T=9)  # another shape (and no grad): measured on its own
    A.choose_auto(q2, k2, v2, ("sdpa", "math"), chooser, can_time=True)
    assert len(times.timed) == 6 and len(chooser.choices) == 2


def test_failing_candidates_are_never_chosen(monkeypatch) -> None:
    times = _FakeTimes(monkeypatch, {"sdpa_flash": float("inf"), "sdpa_cudnn": 5.0,
                                     "sdpa_efficient": float("inf")})
    chooser = A.BackendChooser(timer=times)
    q, k, v = _qkv()
    assert A.choose_auto(q, k, v, ("sdpa", "math"), chooser, can_time=True) == "sdpa_cudnn"
    times.ms["sdpa_cudnn"] = float("inf")
    q2, k2, v2 = _qkv(T=3)
    with pytest.raises(RuntimeError, match="no attention backend ran"):
        A.choose_auto(q2, k2, v2, ("sdpa", "math"), chooser, can_time=True)


def test_without_timing_the_static_order_or_a_measurement_decides(monkeypatch) -> None:
    times = _FakeTimes(monkeypatch, {"sdpa_flash": 2.0, "sdpa_cudnn": 1.0,
                                     "sdpa_efficient": 3.0})
    chooser = A.BackendChooser(timer=times)
    q, k, v = _qkv()
    assert A.choose_auto(q, k, v, ("sdpa", "math"), chooser, can_time=False) == "sdpa"
    assert times.timed == []
    A.choose_auto(q, k, v, ("sdpa", "math"), chooser, can_time=True)
    # e.g. torch.compile tracing after an eager step: the measurement is reused
    assert A.choose_auto(q, k, v, ("sdpa", "math"), chooser, can_time=False) == "sdpa_cudnn"


def test_candidates_include_importable_fast_backends_that_apply() -> None:
    q = torch.randn(2, 7, 3, 8)
    assert A.auto_candidates(q, ("flash_attn", "xformers", "sdpa", "math")) == \
        list(A.SDPA_PINNED)  # CPU fp32: flash-attn and xformers do not apply
    assert not A._can_time(q)  # CPU: never timed, so CPU runs keep the static order


def test_real_pinned_sdpa_kernels_time_and_agree_on_cpu() -> None:
    """The real candidates with a wall-clock timer: whatever cannot run on CPU (cuDNN)
    reports inf and loses; the chosen kernel computes the same attention."""
    def wall_ms(fn) -> float:
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)

    chooser = A.BackendChooser(timer=wall_ms)
    q, k, v = _qkv(grad=True)
    best = A.choose_auto(q, k, v, ("sdpa", "math"), chooser, can_time=True)
    (choice,) = chooser.choices.values()
    assert choice.timings_ms["sdpa_cudnn"] == float("inf")
    assert best in A.SDPA_PINNED and best != "sdpa_cudnn"
    torch.testing.assert_close(A.BACKENDS[best](q, k, v), A._math(q, k, v), rtol=1e-5,
                               atol=1e-5)


def test_attention_module_records_the_choice(monkeypatch) -> None:
    times = _FakeTimes(monkeypatch, {"sdpa_flash": 2.0, "sdpa_cudnn": 1.0,
                                     "sdpa_efficient": 3.0})
    monkeypatch.setattr(A, "_CHOOSER", A.BackendChooser(timer=times))
    monkeypatch.setattr(A, "_can_time", lambda q: True)
    layer = A.Attention(24, 3, "auto")
    layer(torch.randn(2, 5, 24))
    assert layer.last_backend == "sdpa_cudnn"
    assert [c.backend for c in A.attention_choices()] == ["sdpa_cudnn"]


@pytest.mark.gpu
def test_gpu_auto_times_real_kernels_and_matches_math() -> None:
    """SD-DiT-XL/2's attention shape (head dim 72): every candidate is timed with CUDA
    events, the winner ran, and it computes what the math backend computes."""
    q, k, v = (torch.randn(4, 205, 16, 72, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    chooser = A.BackendChooser()
    best = A.choose_auto(q, k, v, A._importable_backends(), chooser, can_time=True)
    (choice,) = chooser.choices.values()
    assert best == min(choice.timings_ms, key=choice.timings_ms.get)
    print(f"\nattention auto at {choice.key}: {best}; ms: {choice.timings_ms}")
    torch.testing.assert_close(A.BACKENDS[best](q, k, v).float(), A._math(q, k, v).float(),
                               rtol=2e-2, atol=2e-2)
