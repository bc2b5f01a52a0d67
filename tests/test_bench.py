"""The kernel benchmark's definitions are sound without a GPU, and it says so when run."""

import pytest
import torch

from bench import kernels
from bench._harness import KernelCase


@pytest.fixture(scope="module")
def cases() -> list[KernelCase]:
    return kernels.load_cases(list(kernels.CASE_MODULES))


def test_every_family_has_cases(cases: list[KernelCase]) -> None:
    families = {c.op.split("_")[0] for c in cases}
    assert len(cases) >= 6, [c.op for c in cases]
    assert families, families


def test_cases_build_inputs_with_gradients(cases: list[KernelCase]) -> None:
    for case in cases:
        inputs = case.make_inputs(torch.device("cpu"))
        assert any(getattr(v, "requires_grad", False) for v in inputs.values()), case.op
        assert case.bytes_fwd > 0 and case.bytes_bwd > 0, case.op


def test_unknown_family_is_rejected() -> None:
    with pytest.raises(ValueError, match="--ops"):
        kernels.load_cases(["nope"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_runs_without_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert kernels.main(["--out", "/nonexistent/never-written.json"]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_train_step_bench_runs_on_cpu(tmp_path) -> None:
    from bench import train_step

    out = tmp_path / "train_step.json"
    rc = train_step.main(["--model", "SD-DiT-tiny", "--batch", "2", "--steps", "2",
                          "--warmup", "1", "--variants", "reference", "--device", "cpu",
                          "--out", str(out)])
    assert rc == 0
    import json

    row = json.loads(out.read_text())["results"][0]
    assert row["images_per_s"] > 0 and row["train_gflops_per_image"] > 0
