"""`sddit eval --ckpt`: a real SD-DiT-tiny checkpoint through the EDM sampler, the Inception
network and the JSON record (10 samples, 1 sampler step, so it stays a few seconds)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import metrics
from metrics.statistics import RunningStatistics
from sddit import eval as cli
from sddit.cli import main as sddit_main


def test_eval_parser_registers_as_a_subcommand() -> None:
    parser = argparse.ArgumentParser(prog="sddit")
    cli.add_eval_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--ckpt", "run", "--num", "1000", "--cfg-scale", "1.5"])
    assert args.func is cli.run_eval
    assert (args.ckpt, args.num, args.cfg_scale, args.steps, args.ref) == (
        "run",
        1000,
        1.5,
        18,
        "animal-mnist",
    )
    with pytest.raises(SystemExit):  # --ckpt and --samples are exclusive, one is required
        parser.parse_args(["eval", "--num", "10"])


@pytest.mark.timeout(60)
def test_eval_device_is_decided_where_training_decides_it(tmp_path, capsys) -> None:
    """--device goes through train.distributed.resolve_device: a bad value or a CUDA request
    without CUDA is one line naming --device, exit 2, before any scoring."""
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), np.uint8))
    assert sddit_main(["eval", "--samples", str(samples), "--device", "nope"]) == 2
    assert "--device must be 'auto', 'cpu' or 'cuda', got 'nope'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert sddit_main(["eval", "--samples", str(samples), "--device", "cuda"]) == 2
        assert "--device = 'cuda' but no CUDA device" in capsys.readouterr().err


def random_reference(path):
    """A reference .npz with random features (40 of them), for tests about the evaluation
    pipeline rather than the value of the FID."""
    rng = np.random.default_rng(0)
    feats = np.abs(rng.standard_normal((40, metrics.FEATURE_DIM))).astype(np.float32)
    mu, sigma = metrics.compute_statistics(feats)
    metrics.save_reference(path, metrics.Reference(mu, sigma, feats, {"dataset": "random"}))
    return path


def test_eval_cli_on_a_checkpoint_writes_the_record(tmp_path, capsys) -> None:
    model = pytest.importorskip("model")
    checkpoint = pytest.importorskip("train.checkpoint")
    net = model.build("SD-DiT-tiny")
    run_dir = tmp_path / "run"
    checkpoint.save_checkpoint(
        str(run_dir),
        7,
        {
            "model_build": {"name": "SD-DiT-tiny", "overrides": {}},
            "ema": net.state_dict(),
            "config": {"note": "test"},
        },
        keep_last=1,
    )
    ref = random_reference(tmp_path / "ref.npz")
    out = tmp_path / "eval" / "record.json"
    rc = sddit_main(
        [
            "eval",
            "--ckpt",
            str(run_dir),
            "--num",
            "10",
            "--steps",
            "1",
            "--batch-size",
            "5",
            "--ref",
            str(ref),
            "--out",
            str(out),
            "--fid-method",
            "features",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["step"] == 7 and record["checkpoint"].endswith("ckpt-00000007.pt")
    assert record["num_samples"] == 10 and record["sampler"]["num_steps"] == 1
    assert record["reference"] == {"dataset": "random"}
    assert np.isfinite(record["fid"]) and record["fid"] > 0
    assert record["network"]["sha256"] == metrics.load_network().sha256
    assert (tmp_path / "eval" / "record.png").is_file() and record["grid"].endswith(".png")
    assert "FID" in capsys.readouterr().out


# ----------------------------------------------------------------------------- distributed


def _stub_network() -> metrics.InceptionNetwork:
    """A cheap stand-in with the same contract ([N, 3, 299, 299] -> [N, 2048])."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(192, 2048), nn.ReLU())
    return metrics.InceptionNetwork(module.eval(), "stub", "0" * 64, "stub", torch.device("cpu"))


def _stub_sampler(net, labels, seeds, num_steps, cfg_scale, progress):
    images = []
    for seed, label in zip(seeds, labels.tolist(), strict=True):
        gen = torch.Generator().manual_seed(seed)
        images.append(torch.rand(1, 16, 16, generator=gen) * 2 - 1 + 0.1 * label)
    return torch.stack(images).clamp(-1, 1)


def _stub_reference() -> metrics.Reference:
    feats = np.abs(np.random.default_rng(1).standard_normal((64, 2048))).astype(np.float32)
    mu, sigma = metrics.compute_statistics(feats)
    return metrics.Reference(mu, sigma, feats, {"dataset": "stub"})


def _evaluate(num_samples: int) -> dict:
    net = nn.Linear(1, 1)
    net.config = types.SimpleNamespace(num_classes=10)
    result = metrics.evaluate_net(
        net,
        num_samples,
        _stub_reference(),
        batch_size=4,
        progress=False,
        network=_stub_network(),
        fid_method="features",
        sampler=_stub_sampler,
    )
    return {k: result[k] for k in ("fid", "precision", "recall", "num_samples", "world_size")}


def _distributed_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        # Moments reduced over ranks equal numpy's on the whole array.
        full = np.random.default_rng(2).standard_normal((37, 16)) + 3.0
        stats = RunningStatistics(16)
        stats.update(np.array_split(full, world)[rank])
        stats.all_reduce()
        np.testing.assert_allclose(stats.mean(), full.mean(0), rtol=1e-12)
        np.testing.assert_allclose(stats.covariance(), np.cov(full, rowvar=False), rtol=1e-10)
        result = _evaluate(21)  # 21 over 2 ranks: uneven slices exercise the padded gather
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def test_evaluate_net_is_the_same_on_two_ranks(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_distributed_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    single = _evaluate(21)
    assert ranks[0] == ranks[1] and ranks[0]["world_size"] == 2 and single["world_size"] == 1
    assert ranks[0]["num_samples"] == single["num_samples"] == 21
    assert ranks[0]["fid"] == pytest.approx(single["fid"], rel=1e-9)
    assert (ranks[0]["precision"], ranks[0]["recall"]) == (single["precision"], single["recall"])
