"""Run outputs: JSONL metrics, TensorBoard when it imports, GPU telemetry, PNG grids and
the loss curve. Each optional piece degrades to nothing (and says so once) when its
package or driver is missing."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import numpy as np
import torch


class MetricsLogger:
    """Appends one JSON object per line to <run>/metrics.jsonl and mirrors numeric values
    to TensorBoard. Only the main rank writes."""

    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.notes: list[str] = []
        self._file = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._file = open(self.path, "a")  # noqa: SIM115 - lives as long as the run
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError as exc:
                self.notes.append(f"TensorBoard disabled ({exc}); metrics go to {self.path}")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, int | float) \
                        and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class GpuTelemetry:
    """Utilisation, memory, power and clocks of one GPU through pynvml (nvidia-ml-py).
    Without the package, a driver or a CUDA device, read() returns {}."""

    def __init__(self, device: torch.device) -> None:
        self._nvml = None
        self._handle = None
        self.note = ""
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(_physical_index(index))
            self._nvml = pynvml
        except ImportError:
            self.note = "GPU telemetry off: nvidia-ml-py (pynvml) is not installed"
        except Exception as exc:  # NVMLError_LibraryNotFound, driver mismatch, ...
            self.note = f"GPU telemetry off: {exc}"

    def read(self) -> dict[str, float]:
        if self._nvml is None:
            return {}
        nv, h = self._nvml, self._handle
        try:
            util = nv.nvmlDeviceGetUtilizationRates(h)
            mem = nv.nvmlDeviceGetMemoryInfo(h)
            return {
                "gpu/util_pct": float(util.gpu),
                "gpu/mem_used_gib": mem.used / 2**30,
                "gpu/power_w": nv.nvmlDeviceGetPowerUsage(h) / 1000.0,
                "gpu/sm_clock_mhz": float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
                "gpu/mem_clock_mhz": float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_MEM)),
            }
        except Exception:
            return {}


def _physical_index(index: int) -> int:
    # NVML numbers GPUs physically; CUDA_VISIBLE_DEVICES may renumber them.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    parts = [p.strip() for p in visible.split(",") if p.strip()]
    if index < len(parts) and parts[index].isdigit():
        return int(parts[index])
    return index


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C'] with C' = 1 or 3 (C = 2 shows its
    first channel). More than 3 channels are latents, which are never written as images:
    decode them with the run's VAE first (train.data.vae)."""
    x = images.detach().float().cpu()
    if x.shape[1] > 3:
        raise ValueError(f"images must have 1 to 3 channels, got {tuple(x.shape)}: samples of "
                         "a latent run must be decoded by its VAE (train.data.vae."
                         "LatentDecoder) before they are saved as images")
    if x.shape[1] == 2:
        x = x[:, :1]
    # The same quantisation FID applies, so a saved .npz scores like the samples did.
    from train.data.images import samples_to_uint8

    return samples_to_uint8(x).permute(0, 2, 3, 1).numpy()


def save_image_grid(images: torch.Tensor, path: str, ncols: int, scale: int = 1,
                    pad: int = 1) -> str:
    """Tiles float [N, C, H, W] images in [-1, 1] row by row into a PNG; `scale` enlarges
    small images."""
    ncols = max(1, min(ncols, len(images)))
    return save_tile_grid(to_uint8_images(images), path, ncols, scale, gap=pad, border=pad)


def save_tile_grid(tiles: np.ndarray, path: str, ncols: int, scale: int = 1, gap: int = 0,
                   border: int = 0) -> str:
    """Tiles uint8 [N, H, W, C] images row by row, `ncols` to a row, into a PNG: `gap`
    pixels between tiles, `border` around them; `scale` enlarges small images. The one
    grid writer (sampling, training, `sddit eval` and the chart)."""
    from PIL import Image

    n, h, w, c = tiles.shape
    nrows = math.ceil(n / ncols)
    canvas = np.zeros((nrows * (h + gap) - gap + 2 * border,
                       ncols * (w + gap) - gap + 2 * border, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        top, left = border + r * (h + gap), border + col * (w + gap)
        canvas[top:top + h, left:left + w] = tiles[i]
    image = Image.fromarray(canvas[..., 0] if c == 1 else canvas)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path, optimize=True)
    return path


def plot_loss_curve(records: list[dict[str, Any]], path: str) -> str | None:
    """Loss (and its named parts) against step from the metrics records; None if empty."""
    rows = [r for r in records if r.get("event") == "train" and "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    keys = ["loss"] + sorted(k[5:] for k in rows[0] if k.startswith("loss/"))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key in keys:
        values = [r.get(key if key == "loss" else f"loss/{key}", float("nan")) for r in rows]
        ax.plot(steps, values, label=key, linewidth=1.5 if key == "loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if all(v > 0 for v in (r["loss"] for r in rows)):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def format_seconds(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"
