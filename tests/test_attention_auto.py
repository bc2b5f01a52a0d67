"""attention="auto" times the candidates once per shape and keeps the fastest.

The CUDA mechanism is tested with an injected timer (and with `can_time` forced): the
right candidates are timed, the fastest wins, the decision is cached per shape and
reported, a failing candidate is never chosen, and where timing cannot run the static
order (or an earlier measurement) decides. On CPU the real candidates are timed with the
wall clock, eagerly and at torch.compile trace time (without a graph break).
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
    times = _FakeTimes(monkeypatch, {"sdpa": 2.0, "sdpa_math": 1.0, "math": 3.0})
    chooser = A.BackendChooser(timer=times)
    q, k, v = _qkv(grad=True)
    got = A.choose_auto(q, k, v, ("sdpa", "math"), chooser, can_time=True)
    assert got == "sdpa_math"
    assert times.timed == ["sdpa", "sdpa_math", "math"]
    assert A.choose_auto(q, k, v, ("sdpa", "math"), chooser, can_time=True) == "sdpa_math"
    assert len(times.timed) == 3, "a cached shape must not be timed again"
    (choice,) = chooser.choices.values()
    assert choice.backend == "sdpa_math" and choice.timings_ms["sdpa"] == 2.0
    assert choice.key == (2, 7, 3, 8, "torch.float32", "cpu", True)
    q2, k2, v2 = _qkv(T=9)  # another shape (and no grad): measured on its own
    A.choose_auto(q2, k2, v2, ("sdpa", "math"), chooser, can_time=True)
    assert len(times.timed) == 6 and len(chooser.choices) == 2


def test_failing_candidates_are_never_chosen(monkeypatch) -> None:
    times = _FakeTimes(monkeypatch, {"sdpa": float("inf"), "sdpa_math": 5.0,
                                     "math": float("inf")})
    chooser = A.BackendChooser(timer=times)
    q, k, v = _qkv()
    assert A.choose_auto(q, k, v, ("sdpa", "math"), chooser, can_time=True) == "sdpa_math"
    times.ms["sdpa_math"] = float("inf")
    q2, k2, v2 = _qkv(T=3)
    with pytest.raises(RuntimeError, match="no attention backend ran"):
        A.choose_auto(q2, k2, v2, ("sdpa", "math"), chooser, can_time=True)


def test_without_timing_the_static_order_or_a_measurement_decides(monkeypatch) -> None:
    times = _FakeTimes(monkeypatch, {"sdpa": 2.0, "sdpa_math": 1.0, "math": 3.0})
    chooser = A.BackendChooser(timer=times)
    q, k, v = _qkv()
    assert A.choose_auto(q, k, v, ("sdpa", "math"), chooser, can_time=False) == "sdpa"
    assert times.timed == []
    A.choose_auto(q, k, v, ("sdpa", "math"), chooser, can_time=True)
    # e.g. a CUDA graph capture after an eager step: the measurement is reused
    assert A.choose_auto(q, k, v, ("sdpa", "math"), chooser, can_time=False) == "sdpa_math"


def test_candidates_on_cpu_are_sdpa_its_math_kernel_and_the_plain_path() -> None:
    q = torch.randn(2, 7, 3, 8)
    assert A.auto_candidates(q, ("flash_attn", "xformers", "sdpa", "math")) == \
        ["sdpa", "sdpa_math", "math"]  # flash-attn and xformers do not apply on CPU
    assert A._can_time(q)  # CPU eager calls are measured


def test_cpu_auto_measures_training_and_sampling_shapes_apart(monkeypatch) -> None:
    """Forward+backward (training) and forward alone (sampling) are separate decisions,
    each timed once on the real CPU candidates, and the winner computes attention."""
    chooser = A.BackendChooser()
    monkeypatch.setattr(A, "_CHOOSER", chooser)
    layer = A.Attention(24, 3, "auto")
    x = torch.randn(2, 5, 24, requires_grad=True)
    layer(x).sum().backward()
    with torch.no_grad():
        layer(x)
    keys = {c.key.with_backward: c for c in chooser.choices.values()}
    assert set(keys) == {True, False} and len(chooser.choices) == 2
    for choice in keys.values():
        assert set(choice.timings_ms) == {"sdpa", "sdpa_math", "math"}
        assert all(0 < t < float("inf") for t in choice.timings_ms.values())
        assert choice.backend == min(choice.timings_ms, key=choice.timings_ms.get)
    q, k, v = _qkv(grad=True)
    for name in A.CPU_CANDIDATES:
        torch.testing.assert_close(A.BACKENDS[name](q, k, v), A._math(q, k, v), rtol=1e-5,
                                   atol=1e-5)


def test_compiled_cpu_step_gets_a_measured_backend_without_a_graph_break(monkeypatch) -> None:
    """Under torch.compile the CPU measurement runs once at trace time, for real, on the
    traced shape and dtype (bf16 under autocast), and the graph stays whole."""
    chooser = A.BackendChooser()
    monkeypatch.setattr(A, "_CHOOSER", chooser)
    torch._dynamo.reset()
    layer = A.Attention(32, 2, "auto")
    x = torch.randn(3, 6, 32, requires_grad=True)

    def loss(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x).float().sum()

    explained = torch._dynamo.explain(loss)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    (choice,) = chooser.choices.values()
    assert choice.key == (3, 6, 2, 16, "torch.bfloat16", "cpu", True)
    assert all(0 < t < float("inf") for t in choice.timings_ms.values())
    torch.compile(loss, fullgraph=True, backend="eager")(x).backward()
    assert layer.last_backend == choice.backend and len(chooser.choices) == 1
    torch._dynamo.reset()


def test_cuda_candidates_are_the_pinned_sdpa_kernels_and_fast_backends() -> None:
    q = torch.randn(2, 7, 3, 8)  # fp32: flash-attn and xformers (fp16/bf16 only) do not apply
    available = ("flash_attn", "xformers", "sdpa", "math")
    assert A.auto_candidates(q, available, cuda=True) == list(A.SDPA_PINNED)


def test_real_pinned_sdpa_kernels_time_and_agree_on_cpu() -> None:
    """The real pinned kernels with a wall-clock timer: whatever cannot run on CPU (cuDNN)
    reports inf and loses; the chosen kernel computes the same attention."""
    def wall_ms(fn) -> float:
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)

    chooser = A.BackendChooser(timer=wall_ms)
    q, k, v = _qkv(grad=True)
    key = chooser.key(q)
    best = chooser.choose_for(key, q.dtype, q.device, list(A.SDPA_PINNED))
    (choice,) = chooser.choices.values()
    assert choice.timings_ms["sdpa_cudnn"] == float("inf")
    assert best in A.SDPA_PINNED and best != "sdpa_cudnn"
    torch.testing.assert_close(A.BACKENDS[best](q, k, v), A._math(q, k, v), rtol=1e-5,
                               atol=1e-5)


def test_attention_module_records_the_choice(monkeypatch) -> None:
    times = _FakeTimes(monkeypatch, {"sdpa": 2.0, "sdpa_math": 1.0, "math": 3.0})
    monkeypatch.setattr(A, "_CHOOSER", A.BackendChooser(timer=times))
    monkeypatch.setattr(A, "_can_time", lambda q: True)
    layer = A.Attention(24, 3, "auto")
    layer(torch.randn(2, 5, 24))
    assert layer.last_backend == "sdpa_math"
    assert [c.backend for c in A.attention_choices()] == ["sdpa_math"]


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
