"""prepare-latents: shards and index written with a small real encoder, read back for training."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_data import make_image_folder, truncate

from sddit.prepare_latents import add_prepare_latents_parser
from train.data import (
    DataConfig,
    adm_center_crop,
    build_batches,
    list_image_folder,
    noise_generator,
    sample_latents,
)
from train.data.latents import (
    index_vae_folder,
    load_vae_encoder,
    prepare_latents,
    run_vae_spec,
)
from train.data.vae import VaeSpec, VaeUnavailableError
from train.logging_utils import to_uint8_images

RESOLUTION = 16


class PoolEncoder(torch.nn.Module):
    """A fixed stand-in VAE: 2x2 average pool, then a seeded 2x2 stride-2 conv to 2C = 8
    channels. Like a real VAE it does not commute with a horizontal flip."""

    def __init__(self, latent_channels: int = 4):
        super().__init__()
        generator = torch.Generator().manual_seed(1234)
        self.weight = torch.randn(2 * latent_channels, 3, 2, 2, generator=generator) / 4
        self.bias = torch.randn(2 * latent_channels, generator=generator) * 0.1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.conv2d(F.avg_pool2d(x, 2), self.weight, self.bias, stride=2)  # [B, 2C, H/4, W/4]
        mean, raw = h.chunk(2, dim=1)
        return mean, torch.tanh(raw) - 2.0  # logvar in (-3, -1)


def encode_files(encoder: PoolEncoder, paths: list[str], flip: bool) -> torch.Tensor:
    crops = [adm_center_crop(Image.open(p).convert("RGB"), RESOLUTION) for p in paths]
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1
    mean, logvar = encoder(x.flip(-1) if flip else x)
    return torch.cat([mean, logvar], dim=1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = make_image_folder(str(tmp_path_factory.mktemp("images")))
    out = str(tmp_path_factory.mktemp("latents"))
    prepare_latents(root, out, encode=PoolEncoder(), scale=0.5, resolution=RESOLUTION,
                    batch_size=4, shard_size=5, dtype="float32", num_workers=0, progress=False)
    return root, out


def test_index_and_shards_round_trip(shards):
    root, out = shards
    with open(os.path.join(out, "index.json")) as f:
        index = json.load(f)
    assert index["format"] == "sddit-latent-shards" and index["count"] == 12
    assert index["moment_shape"] == [8, 4, 4] and index["latent_shape"] == [4, 4, 4]
    assert index["scale"] == 0.5 and index["dtype"] == "float32"
    assert index["class_names"] == ["class_0", "class_1"] and index["num_classes"] == 2
    assert [s["count"] for s in index["shards"]] == [5, 5, 2]
    assert index["provenance"]["encoder"] == "PoolEncoder" and index["provenance"]["skipped"] == []
    assert index["provenance"]["resolution"] == RESOLUTION
    moments = np.concatenate([np.load(os.path.join(out, s["moments"])) for s in index["shards"]])
    flipped = np.concatenate([np.load(os.path.join(out, s["moments_flip"]))
                              for s in index["shards"]])
    labels = np.concatenate([np.load(os.path.join(out, s["labels"])) for s in index["shards"]])
    paths = list_image_folder(root).paths
    encoder = PoolEncoder()
    with torch.no_grad():
        np.testing.assert_allclose(moments, encode_files(encoder, paths, False), atol=1e-6)
        np.testing.assert_allclose(flipped, encode_files(encoder, paths, True), atol=1e-6)
    assert labels.dtype == np.int64 and labels.tolist() == [0] * 6 + [1] * 6
    # The mirror image's encoding is not the mirrored encoding: both must be stored.
    assert not np.allclose(flipped, moments[..., ::-1], atol=1e-3)


def test_latent_batches_sample_from_the_right_moments(shards):
    _, out = shards
    cfg = DataConfig(source="latents", path=out, backend="torch", num_workers=0)
    source = build_batches(cfg, 3, rank=1, world_size=2, seed=4)
    assert (source.num_samples, len(source), source.in_channels, source.resolution) == (12, 2, 4, 4)
    assert source.num_classes == 2 and source.latent_scale == 0.5
    source.set_epoch(2)
    indices, flips = source.sampler.epoch(2)
    assert flips.any() and not flips.all()
    moments = np.load(os.path.join(out, "shard_00000_moments.npy"), mmap_mode="r")
    shard_starts = [0, 5, 10]
    batches = list(source)
    for step, ((x, y), step_indices, step_flips) in enumerate(zip(batches, indices, flips,
                                                                  strict=True)):
        assert x.shape == (3, 4, 4, 4) and x.dtype == torch.float32
        assert y.tolist() == [i // 6 for i in step_indices]
        rows = []
        for i, flip in zip(step_indices, step_flips, strict=True):
            shard = max(k for k, start in enumerate(shard_starts) if start <= i)
            name = f"shard_{shard:05d}_moments{'_flip' if flip else ''}.npy"
            rows.append(np.load(os.path.join(out, name))[i - shard_starts[shard]])
        generator = noise_generator(4, 2, 1, step, torch.device("cpu"))
        expected = sample_latents(torch.from_numpy(np.stack(rows)), 0.5, generator)
        torch.testing.assert_close(x, expected, rtol=0, atol=0)
    assert moments.shape == (5, 8, 4, 4)
    source.set_epoch(2, start_step=1)  # a mid-epoch resume yields the rest of the epoch
    resumed = list(source)
    assert len(resumed) == 1 and torch.equal(resumed[0][0], batches[1][0])
    with pytest.raises(ValueError, match="start_step"):
        source.set_epoch(2, start_step=3)
    # latent_scale overrides the recorded scale; the noise really is random.
    scaled = build_batches(DataConfig(source="latents", path=out, backend="torch",
                                      num_workers=0, latent_scale=1.0), 12, seed=0)
    (x, _), = list(scaled)
    spread = torch.stack([next(iter(scaled))[0] for _ in range(2)]).std(0)
    assert scaled.latent_scale == 1.0 and x.shape == (12, 4, 4, 4) and spread.min() == 0
    scaled.set_epoch(1)
    assert not torch.equal(next(iter(scaled))[0], x)


def test_latent_sampling_statistics():
    mean = torch.full((4000, 1, 1, 1), 0.3)
    logvar = torch.full((4000, 1, 1, 1), np.log(0.25))
    x = sample_latents(torch.cat([mean, logvar], 1), 2.0, torch.Generator().manual_seed(0))
    assert abs(x.mean().item() - 0.6) < 0.05 and abs(x.std().item() - 1.0) < 0.05


def test_corrupt_files_stop_or_are_skipped_and_recorded(tmp_path):
    root = make_image_folder(str(tmp_path / "images"), per_class=3)
    bad = os.path.join(root, "class_0", "img_1.png")
    truncate(bad)
    kwargs = dict(encode=PoolEncoder(), scale=0.5, resolution=RESOLUTION, batch_size=4,
                  num_workers=0, progress=False)
    with pytest.raises(OSError, match="img_1.png"):
        prepare_latents(root, str(tmp_path / "a"), **kwargs)
    index = prepare_latents(root, str(tmp_path / "b"), on_corrupt="skip", **kwargs)
    assert index["count"] == 5 and index["provenance"]["skipped"] == [bad]
    with pytest.raises(FileExistsError, match="overwrite"):
        prepare_latents(root, str(tmp_path / "b"), on_corrupt="skip", **kwargs)


def test_clear_errors(tmp_path, monkeypatch, capsys):
    root = make_image_folder(str(tmp_path / "images"), per_class=1)
    out = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no_vae_here"):
        prepare_latents(root, out, vae_path=str(tmp_path / "no_vae_here"))
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    (vae_dir / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if diffusers were not installed
    with pytest.raises(ImportError, match="pip install diffusers"):
        load_vae_encoder(str(vae_dir))
    with pytest.raises(ValueError, match="exactly one"):
        prepare_latents(root, out)
    with pytest.raises(ValueError, match="scale is required"):
        prepare_latents(root, out, encode=PoolEncoder())
    with pytest.raises(FileNotFoundError, match="missing_images"):
        prepare_latents(str(tmp_path / "missing_images"), out, encode=PoolEncoder(), scale=1.0)
    with pytest.raises(ValueError, match="encode must return"):
        prepare_latents(root, out, encode=lambda x: (x, x[:, :1]), scale=1.0, num_workers=0,
                        progress=False)
    parser = argparse.ArgumentParser()
    add_prepare_latents_parser(parser.add_subparsers())
    args = parser.parse_args(["prepare-latents", root, out, "--vae", str(tmp_path / "nope"),
                              "--resolution", "16", "--num-workers", "0"])
    assert args.func(args) == 2
    assert "vae_path" in (err := capsys.readouterr().err) and "nope" in err


def test_which_vae_decodes_a_run(shards, tmp_path):
    _, out = shards  # encoded by PoolEncoder: the index names no VAE folder
    assert run_vae_spec({"source": "animal-mnist"}) is None  # pixels need no decode
    with pytest.raises(VaeUnavailableError, match="'PoolEncoder', not a VAE folder.*--vae PATH"):
        run_vae_spec({"source": "latents", "path": out})
    vae = tmp_path / "vae"
    vae.mkdir()
    assert run_vae_spec({"source": "latents", "path": out}, override=str(vae)) == VaeSpec(
        str(vae), 0.5)  # the scale from the index
    moved = {"source": "latents", "path": str(tmp_path / "elsewhere"), "vae": str(vae)}
    assert run_vae_spec(moved, recorded={"vae": "/gone", "scale": 0.25},
                        override=str(vae)) == VaeSpec(str(vae), 0.25)
    with pytest.raises(VaeUnavailableError, match="'/gone' \\(recorded in the checkpoint\\)"):
        run_vae_spec(moved, recorded={"vae": "/gone", "scale": 0.25})
    with pytest.raises(VaeUnavailableError, match="scale of this run is unknown"):
        run_vae_spec(moved)  # no record, no index, no data.latent_scale
    assert index_vae_folder({"vae_path": "/a/vae"}) == "/a/vae"
    assert index_vae_folder({"provenance": {"encoder": "diffusers.AutoencoderKL:/b/vae"}}) == (
        "/b/vae")  # indexes written before vae_path was recorded
    with pytest.raises(ValueError, match="data.vae"):
        DataConfig(source="latents", path=out, vae=3).validate()


def test_latents_are_never_written_as_images():
    assert to_uint8_images(torch.zeros(2, 3, 4, 4)).shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match="decoded by its VAE"):
        to_uint8_images(torch.zeros(2, 4, 4, 4))


def test_vae_is_refused_for_a_pixel_run(tmp_path):
    from train.config import UsageError
    from train.sample import checkpoint_decoder

    pixels = {"config": {"data": {"source": "animal-mnist"}}, "latents": None}
    assert checkpoint_decoder(pixels, None, torch.device("cpu")) is None
    with pytest.raises(UsageError, match="--vae .* for latent runs"):
        checkpoint_decoder(pixels, str(tmp_path), torch.device("cpu"))
