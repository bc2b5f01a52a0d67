"""Without CUDA, Triton kernels run through the interpreter, which must be switched on
before triton is first imported."""

import os
import sys
import zlib

import torch

if not torch.cuda.is_available():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("triton was imported before TRITON_INTERPRET=1 could be set")
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def _one_intra_op_thread() -> None:
    # The suite's shapes are small: a second intra-op thread mostly adds synchronisation,
    # which is severe when the cores are shared (measured here: a tiny training step took
    # 70 ms with 1 thread and 1.5 s with 2; an Inception forward 0.2 s against 4.5 s).
    torch.set_num_threads(int(os.environ.get("SDDIT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _fresh_seed(request: pytest.FixtureRequest) -> None:
    # Fresh but reproducible random inputs per test: seeded from the test's id (crc32, not
    # hash(), which changes between processes).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
