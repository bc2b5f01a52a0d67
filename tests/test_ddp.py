"""Two CPU processes (gloo, env:// as torchrun sets it) under DDP or FSDP2 train like one
process with the same global batch, and the real SD-DiT trains under both."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from train import checkpoint as ckpt
from train.config import load_config
from train.loop import train

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.toml")
SMALL_MODEL = ("model.overrides={hidden_size=32, depth=2, num_heads=2, patch_size=8, "
               "head_hidden_dim=32, head_bottleneck_dim=16, n_prototypes=32}")


class DeterministicNet(nn.Module):
    """A class-conditional autoencoder whose loss draws no random numbers, so that one
    process and two can be compared exactly (the real models draw per-rank noise)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(32 * 32, 24)
        self.emb = nn.Embedding(10, 24)
        self.dec = nn.Linear(24, 32 * 32)

    def training_losses(self, x: torch.Tensor, y: torch.Tensor,
                        inputs: object = None) -> dict[str, torch.Tensor]:
        flat = x.flatten(1)  # [B, 1024]
        recon = self.dec(torch.tanh(self.enc(flat) + self.emb(y)))  # [B, 1024]
        loss = (recon - flat).square().mean()
        return {"loss": loss, "recon": loss.detach()}

    def update_teacher(self, momentum: float) -> None:
        pass


def _config(run_dir: str, *sets: str):
    # fp32: a 2-rank and a 1-rank run agree to rounding only when the math is fp32 (bf16
    # GEMMs round differently at a per-rank batch of 4 than at 8).
    return load_config(CONFIG, ["run.precision='fp32'",
                                "schedule.batch_size=8", "schedule.total_steps=4",
                                "schedule.log_every=1", "schedule.ckpt_every=0",
                                "optim.lr=1e-2", "optim.warmup_steps=0", "optim.grad_clip=0.5",
                                "ema.half_life_kimg=0.02", "run.progress_bar=false",
                                "schedule.sample_steps=2", "schedule.sample_per_class=1",
                                f"run.dir={json.dumps(run_dir)}", *sets])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, root: str) -> None:
    """One rank: the deterministic net, then the real SD-DiT, in one process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from train.distributed import shutdown_distributed

    try:
        torch.manual_seed(0)
        train(_config(os.path.join(root, "two")), net=DeterministicNet())
        train(_config(os.path.join(root, "sddit"), SMALL_MODEL, "schedule.total_steps=2"))
        torch.manual_seed(0)
        train(_config(os.path.join(root, "fsdp2"), "distributed.strategy='fsdp2'"),
              net=DeterministicNet())
        train(_config(os.path.join(root, "sddit-fsdp2"), SMALL_MODEL, "schedule.total_steps=2",
                      "distributed.strategy='fsdp2'", "run.activation_checkpointing=true"))
    finally:
        shutdown_distributed()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Spawns 2 ranks once (process start-up dominates the cost) for both tests."""
    root = str(tmp_path_factory.mktemp("ddp"))
    mp.start_processes(_worker, args=(2, _free_port(), root), nprocs=2, join=True,
                       start_method="spawn")
    return root


def _train_rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["event"] == "train"]


@pytest.mark.parametrize("strategy_dir", ["two", "fsdp2"])
def test_two_process_run_matches_one_process(ddp_runs: str, strategy_dir: str,
                                             tmp_path) -> None:
    torch.manual_seed(0)
    single = train(_config(str(tmp_path / "one")), net=DeterministicNet())
    one = ckpt.load_checkpoint(single.checkpoint)
    two = ckpt.load_checkpoint(ckpt.latest_checkpoint(os.path.join(ddp_runs, strategy_dir)))
    assert two["step"] == 4 and len(two["rng"]) == 2  # every rank's RNG is saved
    for part in ("model", "ema"):
        for key in one[part]:
            torch.testing.assert_close(two[part][key], one[part][key], rtol=1e-5, atol=1e-5)
    moved = (one["model"]["enc.weight"] - DeterministicNet().enc.weight).abs().max()
    assert moved > 1e-3  # the comparison is not between untouched weights
    rows_one = _train_rows(str(tmp_path / "one"))
    rows_two = _train_rows(os.path.join(ddp_runs, strategy_dir))
    for a, b in zip(rows_one, rows_two, strict=True):  # logged loss is the all-reduced mean
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4


@pytest.mark.parametrize("strategy_dir", ["sddit", "sddit-fsdp2"])
def test_sd_dit_trains_distributed(ddp_runs: str, strategy_dir: str) -> None:
    run_dir = os.path.join(ddp_runs, strategy_dir)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert state["step"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # own noise
    rows = _train_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2] and "loss/dis" in rows[0]
    assert os.path.isfile(os.path.join(run_dir, "loss_curve.png"))
    assert os.listdir(os.path.join(run_dir, "samples"))  # the EMA grid, gathered under FSDP2
    net, meta = ckpt.load_sampling_model(run_dir, "cpu")
    assert meta["step"] == 2 and net.config.hidden_size == 32
