"""The paper-scale path in miniature, every part real: a diffusers AutoencoderKL (random
weights, 4 latent channels, 4x downsampling) saved to a folder, an RGB image folder of
2 classes x 24 images at 32x32, `sddit prepare-latents` on 2 gloo ranks under torchrun
(equal to one rank; interrupted and resumed), 20 training steps of DiT-tiny on the
latents, `sddit sample` (RGB 32x32 images equal to decoding the raw latents by hand),
`sddit eval` against the folder and an ADM-style .npz, and `bench chart` on the latents.

Only the FID network is a stand-in (a small TorchScript file passed as --network), because
the real one costs ~0.25 s an image on this CPU. Skipped only where diffusers is not
installed; `make setup` installs it (the `latents` extra), so CI runs this.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL  # noqa: E402

import metrics  # noqa: E402
from bench import chart  # noqa: E402
from sddit.cli import main as sddit_main  # noqa: E402
from train.checkpoint import load_sampling_model  # noqa: E402
from train.data.images import samples_to_uint8  # noqa: E402
from train.data.latents import load_vae_encoder, prepare_latents  # noqa: E402
from train.sample import generate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = 0.18215
TRAIN = ["--config", os.path.join(ROOT, "configs", "tiny.toml"), "--set", 'model.name="DiT-tiny"',
         "--set", "model.overrides={}", "--set", 'data.source="latents"', "--set",
         "schedule.total_steps=20", "--set", "schedule.batch_size=16", "--set",
         "schedule.log_every=10", "--set", "schedule.sample_steps=2", "--set",
         "schedule.sample_per_class=2", "--set", "run.progress_bar=false", "--set",
         "run.tensorboard=false"]


def make_vae(folder: str) -> str:
    """A small real AutoencoderKL: 3 blocks (4x downsampling), 4 latent channels."""
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 16, 16),
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)
    vae.save_pretrained(folder)
    return folder


def make_images(root: str) -> str:
    """root/class_<c>/img_<i>.png: 2 classes x 24 RGB images at 32x32, class-tinted noise."""
    rng = np.random.default_rng(0)
    for c in range(2):
        os.makedirs(os.path.join(root, f"class_{c}"))
        for i in range(24):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            pixels[..., c] = 200
            Image.fromarray(pixels).save(os.path.join(root, f"class_{c}", f"img_{i:02d}.png"))
    return root


def stub_network(path: str) -> str:
    """A TorchScript file with the FID network's contract ([N, 3, 299, 299] -> [N, 2048])."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(192, 2048), nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript: what --network reads
        torch.jit.script(module.eval()).save(path)
    return path


def shard_arrays(folder: str) -> dict[str, np.ndarray]:
    return {os.path.basename(p): np.load(p) for p in sorted(glob.glob(f"{folder}/shard_*.npy"))}


class CountingEncoder:
    """The real VAE encoder, counting images; raises KeyboardInterrupt (as Ctrl-C would)
    once `stop_after` images have been encoded."""

    def __init__(self, encode, stop_after: int | None = None):
        self.encode, self.stop_after, self.images = encode, stop_after, 0

    def __call__(self, x: torch.Tensor):
        if self.stop_after is not None and self.images >= self.stop_after:
            raise KeyboardInterrupt
        self.images += len(x)
        return self.encode(x)


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("mini")
    paths = {"base": str(base), "vae": make_vae(str(base / "vae")),
             "images": make_images(str(base / "images")),
             "network": stub_network(str(base / "network.pt")), "latents": str(base / "latents")}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "sddit", "prepare-latents", paths["images"], paths["latents"], "--vae",
         paths["vae"], "--resolution", "32", "--shard-size", "10", "--batch-size", "4",
         "--dtype", "float32", "--num-workers", "0"],
        env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "images/s" in proc.stdout and "on 2 rank(s)" in proc.stdout
    return paths


@pytest.mark.timeout(240)
def test_prepare_latents_on_two_ranks_equals_one_and_resumes(mini, tmp_path):
    with open(os.path.join(mini["latents"], "index.json")) as f:
        index = json.load(f)
    assert index["count"] == 48 and index["moment_shape"] == [8, 8, 8]
    assert index["scale"] == pytest.approx(SCALE) and index["vae_path"] == mini["vae"]
    assert [s["count"] for s in index["shards"]] == [10, 10, 10, 10, 8]
    two_ranks = shard_arrays(mini["latents"])
    one = prepare_latents(mini["images"], str(tmp_path / "one"), vae_path=mini["vae"],
                          resolution=32, shard_size=10, batch_size=4, dtype="float32",
                          num_workers=0, progress=False)
    assert one["shards"] == index["shards"]
    one_rank = shard_arrays(str(tmp_path / "one"))
    assert two_ranks.keys() == one_rank.keys() and len(one_rank) == 15
    for name, array in one_rank.items():
        np.testing.assert_array_equal(two_ranks[name], array, err_msg=name)

    encode, _ = load_vae_encoder(mini["vae"])
    kwargs = dict(scale=SCALE, resolution=32, shard_size=10, batch_size=4, dtype="float32",
                  num_workers=0, progress=False)
    out = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):  # stopped in the third shard (counts are x2: flips)
        prepare_latents(mini["images"], out, encode=CountingEncoder(encode, 44), **kwargs)
    assert not os.path.exists(os.path.join(out, "index.json"))
    done = sorted(glob.glob(os.path.join(out, "shard_*.done.json")))
    stamps = {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(out, "shard_0000[01]*"))}
    assert [os.path.basename(p) for p in done] == ["shard_00000.done.json", "shard_00001.done.json"]
    counting = CountingEncoder(encode)
    prepare_latents(mini["images"], out, encode=counting, **kwargs)
    assert counting.images == 2 * 28  # shards 2-4 only (each image and its mirror image)
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps  # finished shards untouched
    resumed = shard_arrays(out)
    for name, array in one_rank.items():
        np.testing.assert_array_equal(resumed[name], array, err_msg=name)
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_latents(mini["images"], out, encode=counting, **kwargs)
    shutil.rmtree(out)
    os.makedirs(out)
    with open(os.path.join(out, "prepare.json"), "w") as f:  # shards of other settings
        json.dump({"resolution": 64}, f)
    with pytest.raises(FileExistsError, match="resolution: 64 -> 32"):
        prepare_latents(mini["images"], out, encode=counting, **kwargs)


def decode_by_hand(vae_folder: str, latents: torch.Tensor) -> np.ndarray:
    """What `sample` must write: diffusers' own decode of latents / scale, as uint8 NHWC."""
    vae = AutoencoderKL.from_pretrained(vae_folder, local_files_only=True,
                                        low_cpu_mem_usage=False).eval()
    with torch.no_grad():
        pixels = vae.decode(latents / SCALE).sample.clamp(-1, 1)
    return samples_to_uint8(pixels).permute(0, 2, 3, 1).numpy()


def adm_reference(images_root: str, path: str) -> str:
    """An ADM-style reference batch: arr_0 uint8 [N, H, W, 3] of the folder's images."""
    files = sorted(glob.glob(os.path.join(images_root, "*", "*.png")))
    np.savez(path, arr_0=np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]))
    return path


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = sddit_main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.timeout(300)
def test_latent_run_samples_evaluates_and_charts_decoded_images(mini, tmp_path, capsys):
    run = str(tmp_path / "run")
    rc, out, err = run_cli(["train", *TRAIN, "--set", f'data.path="{mini["latents"]}"',
                            "--set", f'run.dir="{run}"'], capsys)
    assert rc == 0, err
    with Image.open(glob.glob(os.path.join(run, "samples", "*.png"))[0]) as grid:
        assert grid.mode == "RGB"  # the loop's grid is decoded too

    # fp32, so that the latents generated by hand below are the same ones
    rc, out, err = run_cli(["sample", "--ckpt", run, "--num", "8", "--steps", "2",
                            "--precision", "fp32", "--out", str(tmp_path / "samples")], capsys)
    assert rc == 0, err
    (npz,) = glob.glob(str(tmp_path / "samples" / "*.npz"))
    written = np.load(npz)["arr_0"]
    assert written.shape == (8, 32, 32, 3) and written.dtype == np.uint8
    net, _ = load_sampling_model(run, "cpu")
    latents = generate(net, [i % 2 for i in range(8)], list(range(8)), num_steps=2)
    assert latents.shape == (8, 4, 8, 8)
    np.testing.assert_array_equal(written, decode_by_hand(mini["vae"], latents))

    reference = adm_reference(mini["images"], str(tmp_path / "ref.npz"))
    fids = []
    for ref in (mini["images"], reference):
        record = str(tmp_path / f"eval-{len(fids)}.json")
        rc, out, err = run_cli(["eval", "--ckpt", run, "--num", "8", "--steps", "2",
                                "--batch-size", "8", "--ref", ref, "--network", mini["network"],
                                "--cache-dir", str(tmp_path / "cache"), "--fid-method",
                                "features", "--no-progress", "--out", record], capsys)
        assert rc == 0, err
        assert "FID" in out
        with open(record) as f:
            scores = json.load(f)
        assert scores["decoder"]["vae"] == mini["vae"] and np.isfinite(scores["fid"])
        fids.append(scores["fid"])
    assert fids[0] == pytest.approx(fids[1])  # the folder and its .npz are the same images

    check_missing_vae(mini, run, tmp_path, capsys)
    check_chart(mini, reference, tmp_path)


def check_missing_vae(mini: dict, run: str, tmp_path, capsys) -> None:
    """Without its VAE, a latent run stops before sampling, naming the folder and the flag;
    --vae finds a moved one."""
    moved = str(tmp_path / "vae-moved")
    shutil.copytree(mini["vae"], moved)
    os.rename(mini["vae"], mini["vae"] + "-away")
    try:
        rc, _, err = run_cli(["sample", "--ckpt", run, "--num", "2", "--steps", "1",
                              "--out", str(tmp_path / "nothing")], capsys)
        assert rc == 2 and mini["vae"] in err and "--vae" in err
        assert not os.path.exists(tmp_path / "nothing")
        rc, _, err = run_cli(["eval", "--ckpt", run, "--num", "2", "--steps", "1", "--ref",
                              mini["images"], "--network", mini["network"], "--no-progress"],
                             capsys)
        assert rc == 2 and mini["vae"] in err and "--vae" in err
        rc, _, err = run_cli(["train", *TRAIN, "--set", f'data.path="{mini["latents"]}"',
                              "--set", f'run.dir="{tmp_path / "run2"}"'], capsys)
        assert rc == 2 and mini["vae"] in err and "data.vae" in err
        assert not glob.glob(str(tmp_path / "run2" / "ckpt-*"))
        assert chart.run_chart(chart_args(mini, str(tmp_path / "ref.npz"), tmp_path)) == 2
        assert mini["vae"] in capsys.readouterr().err and not (tmp_path / "chart-work").exists()
        rc, _, err = run_cli(["sample", "--ckpt", run, "--num", "8", "--steps", "2", "--vae",
                              moved, "--precision", "fp32", "--out", str(tmp_path / "moved")],
                             capsys)
        assert rc == 0, err
        (npz,) = glob.glob(str(tmp_path / "moved" / "*.npz"))
        (first,) = glob.glob(str(tmp_path / "samples" / "*.npz"))
        np.testing.assert_array_equal(np.load(npz)["arr_0"], np.load(first)["arr_0"])
    finally:
        os.rename(mini["vae"] + "-away", mini["vae"])


def chart_args(mini: dict, reference: str, tmp_path) -> argparse.Namespace:
    """A tiny paper-like plan (methods at two checkpoint steps plus a mask sweep point) on
    the latents."""
    parser = argparse.ArgumentParser()
    chart.add_chart_arguments(parser)
    sets = ['data.source="latents"', f'data.path="{mini["latents"]}"', "schedule.batch_size=8",
            "optim.warmup_steps=1", "schedule.log_every=1", "run.progress_bar=false",
            "model.overrides={patch_size=2, hidden_size=32, depth=4, num_heads=2, "
            "head_hidden_dim=32, head_bottleneck_dim=16, n_prototypes=32}"]
    return parser.parse_args(
        ["--methods", "SD-DiT,DiT", "--steps", "2,4", "--fid-samples", "8", "--mask-ratios", "0",
         "--out", str(tmp_path / "chart"), "--work-dir", str(tmp_path / "chart-work"),
         "--reference", reference, "--cache-dir", str(tmp_path / "cache"), "--sampler-steps",
         "2", "--fid-batch", "8", "--no-progress"] + [x for s in sets for x in ("--set", s)])


def check_chart(mini: dict, reference: str, tmp_path) -> None:
    """The tiny plan run: every point scored on decoded RGB images."""
    args = chart_args(mini, reference, tmp_path)
    network = metrics.load_network(mini["network"])
    summary = chart.run_chart_plan(chart.settings_from_args(args), network=network)
    assert summary["complete"] and set(summary["final"]) == {"SD-DiT", "DiT"}
    assert [row["mask_ratio"] for row in summary["mask_sweep"]] == [0.0]
    points = glob.glob(str(tmp_path / "chart" / "points" / "*.json"))
    assert len(points) == 5  # 2 methods x 2 steps, and SD-DiT at mask 0
    for path in points:
        with open(path) as f:
            assert np.isfinite(json.load(f)["fid"])
    pngs = glob.glob(str(tmp_path / "chart" / "samples" / "*.png"))
    assert len(pngs) == 3  # each run's final samples
    for png in pngs:
        with Image.open(png) as grid:  # the 8 decoded 32x32 RGB samples, 2 px apart
            assert grid.mode == "RGB" and grid.size == (10 * 34, 34)


def test_decode_cost_measures_the_run_decoder(mini, tmp_path, capsys):
    from bench import decode_cost

    out = tmp_path / "decode.json"
    assert decode_cost.main(["--vae", mini["vae"], "--latent-size", "8", "--batch", "2",
                             "--repeats", "1", "--device", "cpu", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["image_shape"] == [3, 32, 32] and record["params"] == 62463
    projected = record["projection"]
    assert 0 < projected["decode_gflops_per_image"] < 0.1 and record["images_per_s"] > 0
    assert projected["decode_hours_here"] == pytest.approx(
        50_000 * record["seconds_per_image"] / 3600)
    assert "images/s" in capsys.readouterr().out
    assert decode_cost.main(["--vae", mini["vae"], "--batch", "0"]) == 2
    assert "--batch must be a positive integer" in capsys.readouterr().err
