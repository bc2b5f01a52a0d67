"""Bad input gets a clear error naming the argument or file, before any work."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from test_latents import shards  # noqa: F401  (the module fixture)
from test_train import small_batches, tiny_config

from sddit.cli import main
from train.data.latents import LatentShards
from train.loop import train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    run = tmp_path_factory.mktemp("run")
    train(tiny_config(run, "schedule.total_steps=2"), batches=small_batches())
    return str(run)


@pytest.mark.parametrize("args, message", [
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number"),
    (["--cfg-scale", "-1"], "--cfg-scale must be a finite number >= 0"),
    (["--num", "0"], "--num must be a positive integer"),
    (["--steps", "0"], "--steps must be a positive integer"),
])
def test_sample_refuses_bad_numbers_before_any_work(run_dir, args, message, capsys):
    assert main(["sample", "--ckpt", run_dir, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not os.path.isdir(os.path.join(run_dir, "samples", "cfg"))


def test_sample_names_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    bogus = tmp_path / "weights.pt"
    bogus.write_bytes(b"PK\x03\x04 this is not a checkpoint" * 10)
    assert main(["sample", "--ckpt", str(bogus), "--num", "1"]) == 2
    err = capsys.readouterr().err
    assert "weights.pt" in err and "not an sddit checkpoint" in err
    assert main(["sample", "--ckpt", str(tmp_path / "missing"), "--num", "1"]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


def test_sample_and_eval_name_a_corrupt_checkpoint(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    newest = sorted(p for p in os.listdir(copy) if p.endswith(".pt"))[-1]
    with open(copy / newest, "r+b") as f:
        f.truncate(1000)
    assert main(["sample", "--ckpt", str(copy), "--num", "1"]) == 2
    err = capsys.readouterr().err
    assert newest in err and "truncated" in err and "Traceback" not in err
    assert main(["eval", "--ckpt", str(copy), "--num", "2", "--ref", "animal-mnist:test"]) == 2
    err = capsys.readouterr().err
    assert newest in err and "Traceback" not in err


def _npz(tmp_path, array: np.ndarray) -> str:
    path = str(tmp_path / "samples.npz")
    np.savez(path, arr_0=array)
    return path


def test_eval_reads_float_images_by_their_range(tmp_path):
    from metrics.reference import read_npz_images

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(4, 8, 8, 3)).astype(np.uint8)
    with pytest.warns(UserWarning, match=r"\[0, 255\] pixel values"):
        got = read_npz_images(_npz(tmp_path, pixels.astype(np.float32)))
    assert np.array_equal(got, pixels)  # not clamped to 0/255 as [-1, 1] samples would be
    with pytest.warns(UserWarning, match=r"\[0, 1\] images"):
        got = read_npz_images(_npz(tmp_path, pixels.astype(np.float32) / 255))
    assert np.abs(got.astype(int) - pixels).max() <= 1
    samples = pixels.astype(np.float32) / 127.5 - 1  # the [-1, 1] convention needs no note
    assert np.abs(read_npz_images(_npz(tmp_path, samples)).astype(int) - pixels).max() <= 1
    with pytest.raises(ValueError, match=r"span \[-3, 300\]"):
        read_npz_images(_npz(tmp_path, np.array([[[[-3.0, 300.0]]]], np.float32)))
    with pytest.raises(ValueError, match="nan or inf"):
        read_npz_images(_npz(tmp_path, np.full((1, 2, 2, 3), np.nan, np.float32)))


def _rewrite_shard(out: str, key: str, transform) -> str:
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    name = index["shards"][0][key]
    path = os.path.join(out, name)
    np.save(path, transform(np.load(path)))
    return name


@pytest.mark.parametrize("key, transform, message", [
    ("labels", lambda a: a + 1000, "labels must be in"),
    ("labels", lambda a: a.astype(np.float32), "labels must be integers"),
    ("moments", lambda a: a.astype(np.int32), "moments must be float16 or float32"),
])
def test_bad_latent_shards_are_named(shards, tmp_path, key, transform, message):  # noqa: F811
    out = str(tmp_path / "latents")
    shutil.copytree(shards[1], out)
    name = _rewrite_shard(out, key, transform)
    with pytest.raises(ValueError, match=message) as info:
        LatentShards(out)
    assert name in str(info.value)
