"""The Segmenter seam: the only thing the worker knows about a network.

A Segmenter maps a uint8 NHWC batch of RGB tiles (at ``mpp`` µm/px, ``tile_size_px`` square) to
per-class scores of shape (N, C, tile_size_px / output_stride, tile_size_px / output_stride),
float32 in [0, 1], argmax = label. Normalisation, device placement, channels_last and autocast all
live here so the pipeline stays model-agnostic and testable with a stub.

A network may also offer the streaming half of the seam (:class:`StreamingSegmenter`): host
buffers it can copy from without staging (pinned on a GPU), ``submit`` that queues a batch and
returns at once, and a batch size chosen from free device memory. The pipeline uses it where it
exists, so the next batch is uploaded while the current one runs and no batch waits for the
previous one's scores beyond what stitching needs; plain ``predict`` remains the whole contract.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fprotoseg.model.digest import file_sha256
from fprotoseg.model.errors import CheckpointError, DeviceError

PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
COMPILE_MODES = ("off", "auto", "on")
# On a CPU the network uses every core; a batch of 32 tiles of 256 px keeps its kernels efficient
# without large buffers. The budget is in pixels, not tiles: activations grow with the tile's area,
# and 512 px tiles of the CAM-CNN at 32 a batch peaked at 2.43 GiB, at 8 at 1.06 GiB,
# 3% faster end to end (bench/pipeline.py, median of 3 rounds; docs/benchmarks.md).
CPU_BATCH_SIZE = 32
CPU_BATCH_PIXELS = CPU_BATCH_SIZE * 256 * 256


def cpu_batch_size(tile_size_px: int) -> int:
    """The CPU batch: 32 tiles, fewer where 32 would exceed the pixels of 32 tiles of 256 px."""
    return max(1, min(CPU_BATCH_SIZE, CPU_BATCH_PIXELS // (tile_size_px * tile_size_px)))

# Bounds of the batch chosen from free GPU memory (a multiple of 8 in between). The top bound
# keeps host memory bounded: the pipeline holds four pinned batch slots (about 50 MB each for 256
# tiles of 256 px), and with batches overlapped a larger batch buys little.
MIN_AUTO_BATCH, MAX_AUTO_BATCH = 8, 256


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


class PendingScores(Protocol):
    """Scores of a submitted batch; ``result`` waits for them (the only synchronisation)."""

    def result(self) -> np.ndarray:
        """(N, C, h, w) float32, valid until the caller reuses the ``scores_out`` buffer."""
        ...


@runtime_checkable
class StreamingSegmenter(Protocol):
    """The optional streaming half of the seam (TorchSegmenter has it; stubs need not)."""

    def host_buffer(self, shape: tuple[int, ...], dtype: type | np.dtype) -> np.ndarray:
        """A host array the caller fills and reuses across batches (pinned on CUDA)."""
        ...

    def submit(self, tiles_nhwc_uint8: np.ndarray, scores_out: np.ndarray) -> PendingScores:
        """Queue a batch (a view of a ``host_buffer``); scores land in ``scores_out`` (another)."""
        ...

    def suggest_batch_size(self) -> int:
        """Tiles per batch for this device: from free memory on a GPU, a fixed size on a CPU."""
        ...


@dataclass(frozen=True)
class ReadyScores:
    """Scores already computed (the CPU path, and any plain ``predict`` network)."""

    scores: np.ndarray

    def result(self) -> np.ndarray:
        return self.scores


@dataclass(frozen=True)
class CudaPendingScores:
    """Scores being copied back into pinned host memory; ``result`` waits on one CUDA event."""

    done: Any  # torch.cuda.Event recorded after the device-to-host copy
    scores: np.ndarray

    def result(self) -> np.ndarray:
        self.done.synchronize()
        return self.scores


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


def check_compile_mode(mode: str) -> None:
    """``off`` | ``on`` | ``auto``; anything else is a one-line error."""
    if mode not in COMPILE_MODES:
        raise DeviceError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")


def check_precision(device: str, precision: str) -> None:
    """fp16 autocast is a GPU feature; on CPU only fp32 and bf16 are offered."""
    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if device == "cpu" and precision == "fp16":
        raise DeviceError("fp16 needs a CUDA GPU; on CPU use --precision fp32 (default) or bf16")


@dataclass
class TorchSegmenter:
    """Wraps an ``nn.Module`` whose forward maps a normalised NCHW float batch to class scores.

    CUDA path (streaming): tiles come from pinned host buffers the pipeline reuses, are uploaded
    on their own stream with non-blocking copies (so batch k+1 uploads while batch k runs),
    normalised on the device, run channels_last under fp16/bf16 autocast, and copied back
    non-blocking into pinned score buffers; one event per batch is the only synchronisation.
    CPU path: fp32 by default (bf16 autocast available; slow on CPUs without bf16 instructions),
    computed at submission. ``compile_network``: ``on`` wraps the module in ``torch.compile``; ``auto``
    does so only where a timed comparison on a first batch says it is faster (see
    :meth:`compile_if_faster`); ``off`` (default) never.
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
    compile_network: str = "off"
    compile_report: dict[str, Any] = field(default_factory=dict)
    # The input context one output cell sees, inference options included (None: not stated).
    receptive_field_px: int | None = None
    # The network's own cell stride where an inference option scores finer (else None).
    network_stride_px: int | None = None

    def __post_init__(self) -> None:
        import torch

        self.device = resolve_device(self.device)
        check_precision(self.device, self.precision)
        check_compile_mode(self.compile_network)
        self._torch = torch
        self.module = self.module.to(self.device).eval()
        self.module = self.module.to(memory_format=torch.channels_last)
        self._eager_module = self.module
        # Normalisation folded into one multiply-add: x * scale + shift, x in 0..255.
        mean = torch.tensor(self.mean_rgb, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std_rgb, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (-mean / std).to(self.device)
        # Host buffers handed out by host_buffer(), found again by address in submit().
        self._host_tensors: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._upload_stream = torch.cuda.Stream() if self.device == "cuda" else None
        if self.compile_network == "on":
            self.module = torch.compile(self._eager_module)
            self.compile_report = {"mode": "on", "used": True}

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        torch = self._torch
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device, dtype=dtype)

    @staticmethod
    def _check_tiles(tiles: np.ndarray) -> None:
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[3] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3), got {tiles.dtype} {tiles.shape}")

    def _forward(self, x_nhwc_uint8: Any) -> Any:
        """Normalise on the tensor's device and run the network: (N, C, h, w) scores."""
        torch = self._torch
        x = x_nhwc_uint8.permute(0, 3, 1, 2).float()
        x = (x * self._scale + self._shift).contiguous(memory_format=torch.channels_last)
        with self._autocast():
            return self.module(x)

    def predict(self, tiles_nhwc_uint8: np.ndarray) -> np.ndarray:
        torch = self._torch
        self._check_tiles(tiles_nhwc_uint8)
        with torch.inference_mode():
            host = self._host_tensor(tiles_nhwc_uint8)
            x = host.to(self.device, non_blocking=True)
            scores = self._forward(x)
            return scores.float().cpu().numpy()

    # -------------------------------------------------------------------------- streaming seam
    def host_buffer(self, shape: tuple[int, ...], dtype: type | np.dtype) -> np.ndarray:
        """A host array backed by a torch tensor, page-locked (pinned) on CUDA so copies from it
        are true DMA and can overlap compute; the caller reuses it for every batch."""
        torch = self._torch
        torch_dtype = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float32): torch.float32}[np.dtype(dtype)]
        tensor = torch.empty(shape, dtype=torch_dtype, pin_memory=self.device == "cuda")
        array: np.ndarray = tensor.numpy()
        self._host_tensors[array.__array_interface__["data"][0]] = tensor
        return array

    def _host_tensor(self, array: np.ndarray) -> Any:
        """The (pinned) tensor behind a view of a host_buffer; else a tensor over (or pinned copy of)
        the array."""
        torch = self._torch
        address = array.__array_interface__["data"][0]
        base = self._host_tensors.get(address)
        if base is not None and array.flags.c_contiguous and tuple(base.shape[1:]) == array.shape[1:]:
            return base[: array.shape[0]]
        host = torch.from_numpy(np.ascontiguousarray(array))
        return host.pin_memory() if self.device == "cuda" else host

    def submit(self, tiles_nhwc_uint8: np.ndarray, scores_out: np.ndarray) -> PendingScores:
        """Queue one batch; the scores land in ``scores_out[:N]`` when ``result()`` returns.

        On CUDA nothing here waits for the device: the upload is queued on the upload stream,
        the compute stream waits for it on the device (not the host), and the copy back into
        the pinned ``scores_out`` is queued behind the network with an event after it.
        """
        torch = self._torch
        self._check_tiles(tiles_nhwc_uint8)
        n = tiles_nhwc_uint8.shape[0]
        if self.device != "cuda":
            with torch.inference_mode():
                scores = self._forward(torch.from_numpy(np.ascontiguousarray(tiles_nhwc_uint8)))
                scores_out[:n] = scores.float().numpy()
            return ReadyScores(scores_out[:n])
        host = self._host_tensor(tiles_nhwc_uint8)
        out = self._host_tensor(scores_out)[:n]
        compute = torch.cuda.current_stream()
        with torch.inference_mode():
            with torch.cuda.stream(self._upload_stream):
                x = host.to(self.device, non_blocking=True)
                uploaded = torch.cuda.Event()
                uploaded.record(self._upload_stream)
            compute.wait_event(uploaded)
            x.record_stream(compute)  # allocated on the upload stream, used on the compute stream
            scores = self._forward(x)
            out.copy_(scores.float(), non_blocking=True)
        done = torch.cuda.Event()
        done.record(compute)
        return CudaPendingScores(done=done, scores=scores_out[:n])

    def suggest_batch_size(self) -> int:
        """On CUDA: as many tiles as fit in about 60% of the free device memory, from the peak
        memory of one probe batch of 8 (a multiple of 8, 8..256). On a CPU: :func:`cpu_batch_size`."""
        if self.device != "cuda":
            return cpu_batch_size(self.tile_size_px)
        torch = self._torch
        probe = MIN_AUTO_BATCH
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        side = self.tile_size_px
        tiles = torch.zeros((probe, side, side, 3), dtype=torch.uint8, device="cuda")
        with torch.inference_mode():
            self._forward(tiles)
        torch.cuda.synchronize()
        per_tile = max(1, (torch.cuda.max_memory_allocated() - before) // probe)
        free, _ = torch.cuda.mem_get_info()
        free += torch.cuda.memory_reserved() - torch.cuda.memory_allocated()  # cached, reusable
        # Two batches are on the device at once (one uploading, one running).
        fit = int(0.6 * free / (per_tile * 1.1)) - probe
        return int(min(MAX_AUTO_BATCH, max(MIN_AUTO_BATCH, fit // 8 * 8)))

    # --------------------------------------------------------------------------- torch.compile
    def compile_if_faster(self, sample_nhwc_uint8: np.ndarray, repeats: int = 3) -> dict[str, Any]:
        """Compile the network, time it against eager on ``sample`` (best of ``repeats`` after a
        warm-up), keep the faster, and return the measurement (also in ``compile_report``).

        Why measured, not assumed: inductor's kernels win on some GPUs and lose on others, and on
        a CPU the first call costs minutes of compilation for a gain that may not exist.
        """
        torch = self._torch

        def best_seconds() -> float:
            self.predict(sample_nhwc_uint8)  # warm-up (and, compiled, the compilation)
            times = []
            for _ in range(repeats):
                if self.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                self.predict(sample_nhwc_uint8)
                times.append(time.perf_counter() - t0)
            return min(times)

        self.module = self._eager_module
        eager_s = best_seconds()
        t0 = time.perf_counter()
        self.module = torch.compile(self._eager_module)
        try:
            compiled_s = best_seconds()
        except Exception as exc:  # a compiler missing or failing: stay eager, say why
            self.module = self._eager_module
            self.compile_report = {"mode": "auto", "used": False, "eager_s": eager_s, "error": str(exc)[:200]}
            return self.compile_report
        compile_wall_s = time.perf_counter() - t0
        used = compiled_s < eager_s
        if not used:
            self.module = self._eager_module
        self.compile_report = {
            "mode": "auto",
            "used": used,
            "batch": int(sample_nhwc_uint8.shape[0]),
            "eager_s_per_batch": eager_s,
            "compiled_s_per_batch": compiled_s,
            "speedup": eager_s / compiled_s,
            "compile_and_measure_s": compile_wall_s,
        }
        return self.compile_report


def _rgb(color: Sequence[Any]) -> tuple[int, int, int]:
    red, green, blue = (int(v) for v in color)
    return red, green, blue


def build_inference_module(manifest: dict[str, Any], state_dict: dict[str, Any]) -> Any:
    """Rebuild the network named in the manifest and load its weights strictly."""
    # Importing the architecture modules registers their builders.
    import fprotoseg.model.networks.cam_cnn
    import fprotoseg.model.networks.fprotoseg
    import fprotoseg.model.networks.tiny  # noqa: F401
    from fprotoseg.model.inference_options import ManifestError, apply_inference_options
    from fprotoseg.model.registry import builder

    arch = manifest["architecture"]
    module = builder(arch)(manifest["config"], manifest)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint weights do not match architecture {arch!r}: {first}") from None
    try:
        return apply_inference_options(module, manifest)
    except ManifestError as exc:
        raise CheckpointError(str(exc)) from None


def load_segmenter(
    path: str | Path | None = None,
    *,
    device: str = "auto",
    precision: str = "fp32",
    num_threads: int | None = None,
    compile_network: str = "off",
) -> TorchSegmenter:
    """Read a ``.safetensors`` checkpoint, rebuild its architecture, and wrap it for inference.

    ``compile_network``: ``off`` | ``on`` | ``auto`` (compile, then keep it only if a batch of the
    device's suggested size runs faster; the measurement is in ``compile_report``).
    """
    import torch

    from fprotoseg.model.checkpoint import DEFAULT_CHECKPOINT, read_checkpoint
    from fprotoseg.model.inference_options import inference_geometry

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
    output_stride, field_px = inference_geometry(manifest)
    network_stride = int(manifest["output_stride"])
    classes = [TissueClass(c["name"], _rgb(c["color"])) for c in manifest["classes"]]
    norm = manifest.get("normalisation", {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
    segmenter = TorchSegmenter(
        module=module,
        classes=classes,
        mpp=float(manifest["mpp"]),
        tile_size_px=int(manifest["tile_size_px"]),
        output_stride=output_stride,
        mean_rgb=tuple(norm["mean"]),
        std_rgb=tuple(norm["std"]),
        name=str(manifest.get("name", ckpt_path.stem)),
        checksum_sha256=file_sha256(ckpt_path),
        device=device,
        precision=precision,
        manifest=manifest,
        compile_network="on" if compile_network == "on" else "off",
        receptive_field_px=field_px,
        network_stride_px=network_stride if output_stride != network_stride else None,
    )
    check_compile_mode(compile_network)
    if compile_network == "auto":
        size, batch = segmenter.tile_size_px, segmenter.suggest_batch_size()
        sample = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        segmenter.compile_if_faster(sample)
    return segmenter
