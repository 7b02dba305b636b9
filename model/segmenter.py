"""The Segmenter seam: the only thing the worker knows about a network.

A Segmenter maps a uint8 NHWC batch of RGB tiles (at ``mpp`` µm/px, ``tile_size_px`` square) to
per-class scores of shape (N, C, tile_size_px / output_stride, tile_size_px / output_stride),
float32 in [0, 1], argmax = label. Normalisation, device placement, channels_last and autocast all
live here so the pipeline stays model-agnostic and testable with a stub.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fprotoseg.model.errors import CheckpointError, DeviceError

PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TissueClass:
    """One output class: a QuPath-compatible name and an [r, g, b] colour."""

    name: str
    color: tuple[int, int, int]


@runtime_checkable
class Segmenter(Protocol):
    """What the whole-slide pipeline needs from a network."""

    name: str
    checksum_sha256: str
    classes: Sequence[TissueClass]
    mpp: float
    tile_size_px: int
    output_stride: int
    device: str
    precision: str

    def predict(self, tiles_nhwc_uint8: np.ndarray) -> np.ndarray:
        """Scores (N, C, h, w) float32 for a uint8 (N, H, W, 3) batch; h = H // output_stride."""
        ...


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` where a GPU exists, else ``cpu``; refuse ``cuda`` without one."""
    import torch

    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return device


def choose_device_and_precision(device: str, precision: str | None) -> tuple[str, str]:
    """The one device/precision choice: ``auto`` device -> a GPU where one exists; ``auto`` (or no)
    precision -> fp16 on a GPU, fp32 on a CPU. Used by the CLI and the job service alike."""
    resolved = resolve_device(device)
    if precision in (None, "auto"):
        precision = "fp16" if resolved == "cuda" else "fp32"
    check_precision(resolved, precision)
    return resolved, precision


def check_precision(device: str, precision: str) -> None:
    """fp16 autocast is a GPU feature; on CPU only fp32 and bf16 are offered."""
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if device == "cpu" and precision == "fp16":
        raise DeviceError("fp16 needs a CUDA GPU; on CPU use --precision fp32 (default) or bf16")


@dataclass
class TorchSegmenter:
    """Wraps an ``nn.Module`` whose forward maps a normalised NCHW float batch to class scores.

    CUDA path: pinned host memory, non-blocking copies, channels_last, fp16/bf16 autocast.
    CPU path: fp32 by default (bf16 autocast available; slow on CPUs without bf16 instructions).
    """

    module: Any
    classes: Sequence[TissueClass]
    mpp: float
    tile_size_px: int
    output_stride: int
    mean_rgb: tuple[float, float, float]
    std_rgb: tuple[float, float, float]
    name: str = "unnamed"
    checksum_sha256: str = ""
    device: str = "cpu"
    precision: str = "fp32"
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import torch

        self.device = resolve_device(self.device)
        check_precision(self.device, self.precision)
        self._torch = torch
        self.module = self.module.to(self.device).eval()
        self.module = self.module.to(memory_format=torch.channels_last)
        # Normalisation folded into one multiply-add: x * scale + shift, x in 0..255.
        mean = torch.tensor(self.mean_rgb, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std_rgb, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (-mean / std).to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        torch = self._torch
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device, dtype=dtype)

    def predict(self, tiles_nhwc_uint8: np.ndarray) -> np.ndarray:
        torch = self._torch
        tiles = tiles_nhwc_uint8
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[3] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3), got {tiles.dtype} {tiles.shape}")
        host = torch.from_numpy(np.ascontiguousarray(tiles_nhwc_uint8))
        if self.device == "cuda":
            host = host.pin_memory()
        x = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x * self._scale + self._shift).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), self._autocast():
            scores = self.module(x)
        return scores.float().cpu().numpy()


def file_sha256(path: Path) -> str:
    """Streaming sha256 of a file (checkpoints are tens of MB: never read whole)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _rgb(color: Sequence[Any]) -> tuple[int, int, int]:
    red, green, blue = (int(v) for v in color)
    return red, green, blue


def build_inference_module(manifest: dict[str, Any], state_dict: dict[str, Any]) -> Any:
    """Rebuild the network named in the manifest and load its weights strictly."""
    # Importing the architecture modules registers their builders.
    import fprotoseg.model.fprotoseg
    import fprotoseg.model.tiny  # noqa: F401
    from fprotoseg.model.registry import builder

    arch = manifest["architecture"]
    module = builder(arch)(manifest["config"], manifest)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint weights do not match architecture {arch!r}: {first}") from None
    return module


def load_segmenter(
    path: str | Path | None = None,
    *,
    device: str = "auto",
    precision: str = "fp32",
    num_threads: int | None = None,
) -> TorchSegmenter:
    """Read a ``.safetensors`` checkpoint, rebuild its architecture, and wrap it for inference."""
    import torch

    from fprotoseg.model.checkpoint import DEFAULT_CHECKPOINT, read_checkpoint

    ckpt_path = Path(path) if path is not None else DEFAULT_CHECKPOINT
    if path is None and not ckpt_path.exists():
        raise CheckpointError(
            f"the packaged default model is missing ({ckpt_path}); pass --checkpoint PATH "
            "or set FPROTOSEG_CHECKPOINT"
        )
    if num_threads:
        torch.set_num_threads(num_threads)
    state, manifest = read_checkpoint(ckpt_path)
    module = build_inference_module(manifest, state)
    classes = [TissueClass(c["name"], _rgb(c["color"])) for c in manifest["classes"]]
    norm = manifest.get("normalisation", {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    return TorchSegmenter(
        module=module,
        classes=classes,
        mpp=float(manifest["mpp"]),
        tile_size_px=int(manifest["tile_size_px"]),
        output_stride=int(manifest["output_stride"]),
        mean_rgb=tuple(norm["mean"]),
        std_rgb=tuple(norm["std"]),
        name=str(manifest.get("name", ckpt_path.stem)),
        checksum_sha256=file_sha256(ckpt_path),
        device=device,
        precision=precision,
        manifest=manifest,
    )
