"""The kernel benchmark's definitions are sound without a GPU, it orders its cases, writes
after every case, stops at its budget, and says "no GPU" in its JSON when there is none."""

import json
from types import SimpleNamespace

import pytest
import torch

from bench import kernels
from bench._harness import KernelCase, git_commit


@pytest.fixture(scope="module")
def cases() -> list[KernelCase]:
    return kernels.load_cases(list(kernels.CASE_MODULES))


def test_every_family_has_cases(cases: list[KernelCase]) -> None:
    families = {c.op.split("_")[0] for c in cases}
    assert len(cases) >= 6, [c.op for c in cases]
    assert {"adaln", "gather", "scatter", "edm"} <= families | {"residual"}, families


def test_cases_build_inputs_with_gradients(cases: list[KernelCase]) -> None:
    for case in cases:
        inputs = case.make_inputs(torch.device("cpu"))
        assert any(getattr(v, "requires_grad", False) for v in inputs.values()), case.op
        assert case.bytes_fwd > 0 and case.bytes_bwd > 0, case.op


def test_unknown_family_is_rejected() -> None:
    with pytest.raises(ValueError, match="--ops"):
        kernels.load_cases(["nope"])


def test_order_puts_every_op_first_at_its_widest_shape(cases: list[KernelCase]) -> None:
    ordered = kernels.order_cases(cases)
    assert sorted(id(c) for c in ordered) == sorted(id(c) for c in cases)
    ops = list(dict.fromkeys(c.op for c in cases))
    head = ordered[:len(ops)]
    assert [c.op for c in head] == ops  # each op once, families in their order
    for case in head:
        assert kernels._width(case) == max(kernels._width(c) for c in cases if c.op == case.op)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_runs_without_gpu(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "kernels.json"
    assert kernels.main(["--out", str(out), "--budget-s", "30"]) == 0
    assert "no GPU" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["status"] == "no GPU" and data["results"] == []
    assert len(data["not_run"]) == len(kernels.load_cases(list(kernels.CASE_MODULES)))


def test_budget_stops_cleanly_and_every_case_is_saved(tmp_path, monkeypatch,
                                                      cases: list[KernelCase]) -> None:
    """bench_case and the copy bandwidth are replaced by timed fakes (no GPU here): the JSON
    must hold each finished case as soon as it finishes, and the run must stop before a
    case that would overrun the budget."""
    out = tmp_path / "k.json"
    clock = {"t": 0.0}
    seen_in_file: list[int] = []

    def fake_case(case, copy_gbs, reps):
        if out.exists():
            seen_in_file.append(len(json.loads(out.read_text())["results"]))
        clock["t"] += 10.0  # every case "takes" 10 s
        return [{"op": case.op, "shape": case.shape, "direction": "fwd", "provider": "triton",
                 "median_ms": 1.0, "bytes": 1, "gbs": 1.0, "pct_copy_bw": 1.0,
                 "speedup_vs_compile": 1.0}]

    monkeypatch.setattr(kernels, "bench_case", fake_case)
    monkeypatch.setattr(kernels, "copy_bandwidth_gbs", lambda: 1000.0)
    monkeypatch.setattr(kernels.time, "monotonic", lambda: clock["t"])
    args = SimpleNamespace(out=str(out), reps=1, budget_s=35.0)
    assert kernels.run_cases(kernels.order_cases(cases), args, {"device": "fake"}) == 0
    data = json.loads(out.read_text())
    assert len(data["results"]) == 3  # 30 s done; a 4th would end at 40 s > 35 s
    assert data["status"].startswith("budget: stopped after 3")
    assert len(data["not_run"]) == len(cases) - 3
    assert seen_in_file == [0, 1, 2]  # written after every case, not at the end


def test_sddit_commit_wins_over_git(monkeypatch) -> None:
    monkeypatch.setenv("SDDIT_COMMIT", "0123abc")
    assert git_commit() == "0123abc"


def test_train_step_alias_maps_and_rejects(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import train_step

    assert train_step.main(["--variants", "reference,nope"]) == 2
    assert "nope" in capsys.readouterr().err

