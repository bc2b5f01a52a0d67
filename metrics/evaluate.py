"""Sample a network with the EDM sampler and score the samples: FID, IS, precision/recall.

Seeds are ``seed_offset + i`` for i in [0, num_samples); sample i gets class
``i % num_classes``, so classes are balanced. Under torch.distributed each rank samples a
contiguous, disjoint slice of the seeds; moments are all-reduced and features all-gathered,
rank 0 computes the metrics and broadcasts them, so every rank returns the same dict. A
sample is reproducible whatever the batch or world size (per-seed generators in the sampler).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from metrics.inception import InceptionNetwork, load_network
from metrics.reference import Reference, load_reference
from metrics.statistics import (
    RunningStatistics,
    fid_from_features,
    frechet_distance,
    gather_rows,
    inception_score,
    precision_recall,
)
from train.data.images import samples_to_uint8

Sampler = Callable[..., torch.Tensor]
# A latent run's VAE decode (train.data.vae.LatentDecoder): samples -> pixels in [-1, 1].
Decode = Callable[[torch.Tensor], torch.Tensor]


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _default_sampler() -> Sampler:
    import model

    return model.edm_sample


def score_features(
    features: np.ndarray,
    logits: np.ndarray | None,
    stats: RunningStatistics,
    reference: Reference,
    fid_method: str = "sqrtm",
    compute_pr: bool = True,
    pr_device: str | torch.device = "cpu",
) -> dict:
    """Metrics for generated features against a reference; None where not computable."""
    if fid_method == "features":  # exact and fast for a few thousand samples; needs features
        if reference.features is None:
            raise ValueError("fid_method='features' needs a reference with features")
        fid = fid_from_features(features, reference.features, method="features")
    else:
        mu, sigma = stats.mean(), stats.covariance()
        fid = frechet_distance(mu, sigma, reference.mu, reference.sigma, method=fid_method)
    result: dict = {
        "fid": fid,
        "fid_method": fid_method,
        "inception_score": None,
        "inception_score_std": None,
        "precision": None,
        "recall": None,
    }
    if logits is not None and len(logits) >= 10:
        result["inception_score"], result["inception_score_std"] = inception_score(logits, 10)
    else:
        result["inception_score_note"] = "the Inception network provides no logits"
    if compute_pr and reference.features is not None and len(features) > 3:
        result["precision"], result["recall"] = precision_recall(
            reference.features, features, k=3, device=pr_device
        )
    elif compute_pr:
        result["precision_recall_note"] = "reference has no features or too few samples"
    return result


def _resolve_reference(
    reference: str | Reference,
    network: InceptionNetwork,
    cache_dir,
    batch_size: int,
    progress: bool,
    need_features: bool,
) -> Reference | None:
    """The reference on rank 0 (only rank 0 scores); None on the other ranks."""
    if isinstance(reference, Reference):
        return reference
    rank, world = _rank_world()
    loaded = None
    if rank == 0:
        loaded = load_reference(reference, network, cache_dir, batch_size, progress, need_features)
    if world > 1:
        dist.barrier()  # the others wait while rank 0 computes a missing reference
    return loaded


def evaluate_net(
    net: nn.Module,
    num_samples: int,
    reference: str | Reference = "animal-mnist",
    cfg_scale: float = 1.0,
    num_steps: int = 18,
    batch_size: int = 64,
    seed_offset: int = 0,
    progress: bool = True,
    *,
    network: InceptionNetwork | None = None,
    network_path: str | None = None,
    cache_dir: str | None = None,
    compute_pr: bool = True,
    fid_method: str = "sqrtm",
    keep_images: int = 0,
    sampler: Sampler | None = None,
    decode: Decode | None = None,
) -> dict:
    """Generate `num_samples` images with the EDM sampler and score them against `reference`.
    `decode` turns a latent run's samples into images (on each rank, batch by batch).

    Returns a dict with fid, inception_score (None: the default network has no logits),
    precision, recall, num_samples, sampler settings, network and reference provenance,
    timings, and under "images" the first `keep_images` uint8 [N, C, H, W] samples (rank 0).
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rank, world = _rank_world()
    device = next(net.parameters()).device
    network = network or load_network(network_path, device)
    started = time.perf_counter()
    ref = _resolve_reference(reference, network, cache_dir, batch_size, progress, compute_pr)
    seconds = {"reference": time.perf_counter() - started}
    started = time.perf_counter()
    run = _sample_features(net, network, sampler or _default_sampler(), num_samples,
                           batch_size, seed_offset, num_steps, cfg_scale, keep_images, progress,
                           decode)
    seconds["sample_and_features"] = time.perf_counter() - started
    result: dict | None = None
    if rank == 0:
        started = time.perf_counter()
        result = score_features(run.features, run.logits, run.stats, ref, fid_method,
                                compute_pr, device)
        seconds["metrics"] = time.perf_counter() - started
        result.update({
            "num_samples": run.stats.num,
            "sampler": _sampler_record(num_steps, cfg_scale, seed_offset, num_samples,
                                       int(net.config.num_classes)),
            "network": network.describe(), "reference": ref.provenance,
            "decoder": getattr(decode, "describe", lambda: None)(),
            "world_size": world, "seconds": seconds})
    if world > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    if rank == 0 and keep_images:
        result["images"] = torch.cat(run.kept)[:keep_images].numpy()
    return result


@dataclass
class _SampledFeatures:
    stats: RunningStatistics  # reduced over ranks
    features: np.ndarray  # [N, dim], every rank's rows
    logits: np.ndarray | None
    kept: list[torch.Tensor]  # this rank's first uint8 samples, for keep_images


def _sample_features(net: nn.Module, network: InceptionNetwork, sample_fn: Sampler,
                     num_samples: int, batch_size: int, seed_offset: int, num_steps: int,
                     cfg_scale: float, keep_images: int, progress: bool,
                     decode: Decode | None = None) -> _SampledFeatures:
    """This rank's share of the samples (sample i: seed seed_offset + i, class i % classes)
    through the network, batch by batch, then gathered from every rank."""
    rank, world = _rank_world()
    device = next(net.parameters()).device
    num_classes = int(net.config.num_classes)
    indices = np.array_split(np.arange(num_samples), world)[rank]  # this rank's slice
    stats = RunningStatistics(device=device)
    features, logits, kept = [], [], []
    bar = tqdm(total=num_samples, desc="sample + features", unit="img",
               disable=not progress or rank != 0)
    for chunk in np.array_split(indices, max(1, -(-len(indices) // batch_size))):
        if len(chunk) == 0:
            continue
        seeds = [seed_offset + int(i) for i in chunk]
        labels = torch.as_tensor(chunk % num_classes, dtype=torch.long, device=device)
        samples = sample_fn(net, labels, seeds, num_steps=num_steps, cfg_scale=cfg_scale,
                            progress=False)  # [B, C, H, W] in ~[-1, 1]
        images = samples_to_uint8(samples if decode is None else decode(samples))
        if len(kept) * batch_size < keep_images:
            kept.append(images.cpu())
        feats, batch_logits = network.features(images)
        stats.update(feats)
        features.append(feats)
        if batch_logits is not None:
            logits.append(batch_logits)
        bar.update(len(chunk) * world)
    bar.close()
    stats.all_reduce()
    local = torch.cat(features) if features else torch.zeros(0, stats.dim, device=device)
    all_logits = gather_rows(torch.cat(logits)).cpu().numpy() if logits else None
    return _SampledFeatures(stats, gather_rows(local).cpu().numpy(), all_logits, kept)


def _sampler_record(num_steps: int, cfg_scale: float, seed_offset: int, num_samples: int,
                    num_classes: int) -> dict:
    return {"name": "edm_heun", "num_steps": num_steps, "cfg_scale": cfg_scale,
            "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0,
            "seeds": [seed_offset, seed_offset + num_samples - 1],
            "labels": f"i % {num_classes}"}


def evaluate_images(
    images: Sequence | np.ndarray | torch.Tensor | str,
    reference: str | Reference = "animal-mnist",
    *,
    network: InceptionNetwork | None = None,
    network_path: str | None = None,
    cache_dir: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
    compute_pr: bool = True,
    fid_method: str = "sqrtm",
) -> dict:
    """Metrics for images produced elsewhere: a folder, an .npz, or a uint8 array."""
    from metrics.reference import (
        features_of_batches,
        iter_array_batches,
        iter_folder_batches,
        list_image_files,
        read_npz_images,
    )

    network = network or load_network(network_path)
    ref = reference
    if not isinstance(ref, Reference):  # single process: no rank logic here
        ref = load_reference(reference, network, cache_dir, batch_size, progress, compute_pr)
    source: dict = {"kind": "array"}
    if isinstance(images, str) and images.endswith(".npz"):
        array = read_npz_images(images)
        batches, total, source = iter_array_batches(array, batch_size), len(array), {"npz": images}
    elif isinstance(images, str):
        files = list_image_files(images)
        batches, total, source = (
            iter_folder_batches(files, batch_size),
            len(files),
            {"folder": images},
        )
    else:
        array = np.asarray(images)
        batches, total = iter_array_batches(array, batch_size), len(array)
    stats, features, logits = features_of_batches(
        network, batches, total, progress, "sample features"
    )
    result = score_features(features, logits, stats, ref, fid_method, compute_pr)
    result.update(
        {
            "num_samples": stats.num,
            "samples": source,
            "network": network.describe(),
            "reference": ref.provenance,
        }
    )
    return result
