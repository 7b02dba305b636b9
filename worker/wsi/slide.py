"""One whole-slide reader over OpenSlide and tiffslide, with the pixel size resolved and the file vetted.

Why two backends: OpenSlide (openslide-bin bundles the C library) reads the vendor formats (Aperio
JPEG/JPEG 2000, Hamamatsu NDPI, MIRAX, generic tiled TIFF, ...). Where it has no native driver
(OME-TIFF: ``detect_format`` is None) we use tiffslide instead of letting OpenSlide fall back to a
PIL ImageSlide, which would decode the whole image at once.

Why the vetting: a TIFF header can claim any size. Before a single pixel is decoded we check the
claimed dimensions against absolute limits and against the bytes the file really holds, and that
no tile points past the end of the file (a truncated upload), so a decompression bomb or a
truncated file fails in milliseconds with a one-line reason. The checks live in
:mod:`fprotoseg.worker.wsi.validate`, shared with the upload sniffer of the API.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fprotoseg.worker.errors import (
    EmptySlideError,
    FieldHint,
    MissingMppError,
    SlideError,
    UnsupportedFormatError,
)
from fprotoseg.worker.wsi.validate import TIFF_MAGICS, check_dimensions, one_line, quiet_tifffile, vet_tiff

# Smallest plausible pixel size (µm/px): anything below is a unit error in the metadata.
MIN_MPP = 0.01
MAX_MPP = 100.0
# the fix for a slide without a pixel size: the CLI's --mpp, the API's form field mpp
MPP_HINT = FieldHint("mpp", "0.5 for a 20x scan, 0.25 for 40x")
# Decoding a chunk holds its RGBA (OpenSlide's buffer and numpy's copy) and RGB at once.
SCALED_BYTES_PER_PX = 11
# Regions up to this size decode into a buffer each reader thread keeps (tiles and runs of 8
# row neighbours of 256 px tiles, 1,600 x 256 px: no allocation, no page faults per read); larger
# ones (the tissue stage's chunks) get a buffer of their own.
REUSED_REGION_BYTES = 2 * 2**20
MAX_SCALED_BYTES_IN_FLIGHT = 64 * 2**20

@dataclass
class Slide:
    """An opened whole-slide image. Coordinates are in level pixels unless a name says ``level0``.

    ``read_level(level, x_px, y_px, w_px, h_px)`` returns RGB uint8 (h, w, 3) and is thread-safe:
    OpenSlide handles are, and tiffslide gets one handle per thread.
    """

    path: Path
    reader: str
    vendor: str | None
    width_px: int
    height_px: int
    mpp: float
    mpp_source: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict[str, str] = field(repr=False, default_factory=dict)
    _handle: Any = field(repr=False, default=None)
    _local: threading.local = field(repr=False, default_factory=threading.local)
    _extra_handles: list[Any] = field(repr=False, default_factory=list)
    _lock: threading.Lock = field(repr=False, default_factory=threading.Lock)
    # OpenSlide's C region read, resolved once at open (None: the public read_region path).
    _raw_read: Callable[..., None] | None = field(repr=False, default=None)

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def level_mpp(self, level: int) -> float:
        """µm per pixel of a pyramid level (square pixels assumed, as every WSI format does)."""
        return self.mpp * self.level_downsamples[level]

    def best_level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level that is still at least as fine as ``target_mpp`` (level 0 if none is).

        Reading from a finer level and downsampling keeps detail; never reading level 0 when a
        coarser level serves keeps decoding cost proportional to what the model sees.
        """
        best = 0
        for level in range(self.level_count):
            fine_enough = self.level_mpp(level) <= target_mpp * (1 + 1e-3)
            if fine_enough and self.level_downsamples[level] >= self.level_downsamples[best]:
                best = level
        return best

    def _reader_handle(self) -> Any:
        if self.reader == "openslide":
            return self._handle
        handle = getattr(self._local, "handle", None)
        if handle is None:
            import tiffslide

            handle = tiffslide.TiffSlide(str(self.path))
            self._local.handle = handle
            with self._lock:
                self._extra_handles.append(handle)
        return handle

    def read_level(
        self, level: int, x_px: int, y_px: int, w_px: int, h_px: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """RGB uint8 (h, w, 3) of a rectangle of ``level``; parts outside the slide are white glass.

        ``out`` (a C-contiguous uint8 (h, w, 3) array, e.g. one slot of a batch buffer) receives
        the pixels without an intermediate copy: the reader threads decode straight into the
        network's input. The conversion from the backend's RGBA runs in OpenCV (GIL released),
        not as a strided numpy slice, which cost a fifth of a 256 px tile's read time.
        """
        if out is None:
            out = np.empty((h_px, w_px, 3), dtype=np.uint8)
        elif out.shape != (h_px, w_px, 3) or out.dtype != np.uint8:
            raise ValueError(f"out has shape {out.shape} {out.dtype}, expected ({h_px}, {w_px}, 3) uint8")
        lw, lh = self.level_dimensions[level]
        x0, y0 = max(x_px, 0), max(y_px, 0)
        x1, y1 = min(x_px + w_px, lw), min(y_px + h_px, lh)
        inside = (x0, y0, x1, y1) == (x_px, y_px, x_px + w_px, y_px + h_px)
        if not inside:
            out[...] = 255
        if x1 <= x0 or y1 <= y0:
            return out
        ds = self.level_downsamples[level]
        loc = (round(x0 * ds), round(y0 * ds))
        size = (x1 - x0, y1 - y0)
        target = out[y0 - y_px : y1 - y_px, x0 - x_px : x1 - x_px]
        try:
            handle = self._reader_handle()
            raw = self._raw_read
            if raw is not None:
                bgra, pointer = self._region_buffer(size)
                raw(handle._osr, pointer, loc[0], loc[1], level, *size)
                _premultiplied_bgra_on_white(bgra, target)
                return out
            if self.reader == "openslide":
                rgba = np.asarray(handle.read_region(loc, level, size))
            else:
                rgba = np.asarray(handle.read_region(loc, level, size, as_array=True))
        except Exception as exc:  # backend errors carry no common base class
            raise SlideError(
                f"cannot decode {self.path.name} at level {level} ({x0}, {y0}): "
                f"{one_line(exc)} (truncated or corrupt file?)"
            ) from exc
        _to_rgb_on_white(rgba, size, target)
        return out

    def _region_buffer(self, size: tuple[int, int]) -> tuple[np.ndarray, Any]:
        """A (h, w, 4) uint8 buffer for OpenSlide to decode into, with its C pointer: this
        thread's own for tile-sized regions (reused read after read), a fresh one for larger
        regions."""
        w, h = size
        n_bytes = w * h * 4
        if n_bytes > REUSED_REGION_BYTES:
            fresh = np.empty((h, w, 4), dtype=np.uint8)
            return fresh, fresh.ctypes.data_as(_UINT32_P)
        kept = getattr(self._local, "region_buffer", None)
        if kept is None:
            flat = np.empty(REUSED_REGION_BYTES, dtype=np.uint8)
            kept = self._local.region_buffer = (flat, flat.ctypes.data_as(_UINT32_P))
        return kept[0][:n_bytes].reshape(h, w, 4), kept[1]

    def scaled_geometry(self, target_mpp: float) -> tuple[int, int, float, tuple[int, int]]:
        """(level, integer factor, actual mpp, (height, width)) of the slide at about ``target_mpp``.

        The scale from the chosen level is an integer box factor, so INTER_AREA is an exact
        average and chunk seams are invisible.
        """
        level = self.best_level_for_mpp(target_mpp)
        factor = max(1, math.floor(target_mpp / self.level_mpp(level) + 1e-6))
        lw, lh = self.level_dimensions[level]
        shape = (max(1, math.ceil(lh / factor)), max(1, math.ceil(lw / factor)))
        return level, factor, self.level_mpp(level) * factor, shape

    def iter_scaled(
        self, target_mpp: float, chunk_px: int = 2048, threads: int = 1
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """The slide at about ``target_mpp`` as (row, col, RGB chunk) pieces: memory per chunk only.

        ``threads`` > 1 decodes and shrinks chunks concurrently, in order: on a 100,000 px slide
        the tissue pass reads dozens of chunks, and one thread would make it a serial stage of its
        own. Chunks are then 1024 px and at most ``MAX_SCALED_BYTES_IN_FLIGHT`` of them are
        decoded at once (each costs about 11 bytes per pixel while it is converted): the malloc
        heap keeps its high-water mark, so many large chunks at once would raise peak memory for
        the whole run.
        """
        level, factor, _, _ = self.scaled_geometry(target_mpp)
        lw, lh = self.level_dimensions[level]
        if threads > 1:
            chunk_px = min(chunk_px, 1024)
        step = max(factor, (chunk_px // factor) * factor)
        in_flight = max(1, min(threads, MAX_SCALED_BYTES_IN_FLIGHT // (step * step * SCALED_BYTES_PER_PX)))
        chunks = [(y, x) for y in range(0, lh, step) for x in range(0, lw, step)]

        def read(y: int, x: int) -> tuple[int, int, np.ndarray]:
            import cv2

            h, w = min(step, lh - y), min(step, lw - x)
            oh, ow = math.ceil(h / factor), math.ceil(w / factor)
            tile = self.read_level(level, x, y, ow * factor, oh * factor)
            if factor > 1:
                tile = cv2.resize(tile, (ow, oh), interpolation=cv2.INTER_AREA)
            return y // factor, x // factor, tile

        if threads <= 1:
            for y, x in chunks:
                yield read(y, x)
            return
        from collections import deque
        from concurrent.futures import Future, ThreadPoolExecutor

        with ThreadPoolExecutor(in_flight, thread_name_prefix="fprotoseg-scaled") as pool:
            pending: deque[Future[tuple[int, int, np.ndarray]]] = deque()
            todo = iter(chunks)
            for y, x in todo:
                pending.append(pool.submit(read, y, x))
                if len(pending) >= in_flight:
                    break
            while pending:
                result = pending.popleft().result()
                nxt = next(todo, None)
                if nxt is not None:
                    pending.append(pool.submit(read, *nxt))
                yield result

    def read_scaled(self, target_mpp: float, chunk_px: int = 2048) -> tuple[np.ndarray, float]:
        """The whole slide as RGB at about ``target_mpp``; returns (image, actual_mpp)."""
        _, _, mpp, (out_h, out_w) = self.scaled_geometry(target_mpp)
        out = np.empty((out_h, out_w, 3), dtype=np.uint8)
        for y, x, tile in self.iter_scaled(target_mpp, chunk_px):
            out[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
        return out, mpp

    def metadata(self) -> dict[str, Any]:
        """What ``fprotoseg info`` prints and provenance records."""
        return {
            "path": str(self.path),
            "reader": self.reader,
            "vendor": self.vendor,
            "width_px": self.width_px,
            "height_px": self.height_px,
            "mpp": self.mpp if math.isfinite(self.mpp) else None,
            "mpp_source": self.mpp_source,
            "level_count": self.level_count,
            "level_dimensions": [list(d) for d in self.level_dimensions],
            "level_downsamples": list(self.level_downsamples),
            "level_mpp": [
                self.level_mpp(i) if math.isfinite(self.mpp) else None for i in range(self.level_count)
            ],
        }

    def close(self) -> None:
        for handle in [self._handle, *self._extra_handles]:
            if handle is not None:
                with contextlib.suppress(Exception):
                    handle.close()
        self._handle = None
        self._extra_handles.clear()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_UINT32_P = ctypes.POINTER(ctypes.c_uint32)


def _raw_openslide_reader(handle: Any) -> Callable[..., None] | None:
    """OpenSlide's C ``openslide_read_region`` as openslide-python binds it (with its error check),
    or None where that binding or the handle's C pointer is not there (other versions).

    Why not the public ``read_region``: it allocates and zero-fills a buffer, un-premultiplies
    it, and wraps it in a PIL image that numpy then copies again: a sixth of a 256 px tile's
    read, and the per-tile read is the pipeline's ceiling on a GPU host. Decoding into a reused
    buffer and converting once, straight into the batch slot, skips all of that. The pixels are
    the same (tests compare both paths).
    """
    if sys.byteorder != "little" or not hasattr(handle, "_osr"):
        return None  # premultiplied ARGB words are B, G, R, A bytes only on little-endian hosts
    try:
        from openslide import lowlevel
    except ImportError:  # pragma: no cover - openslide-python is a dependency
        return None
    raw: Callable[..., None] | None = getattr(lowlevel, "_read_region", None)
    return raw


def _premultiplied_bgra_on_white(bgra: np.ndarray, out: np.ndarray) -> None:
    """OpenSlide's premultiplied ARGB (B, G, R, A bytes) composited on white into RGB ``out``.

    Premultiplied colour over white is ``c + (255 - a)``; where every pixel is opaque (nearly
    every tile) that is the colour itself, converted by OpenCV with the GIL released.
    """
    import cv2

    if out.flags.c_contiguous:
        cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB, dst=out)
    else:
        out[...] = cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB)
    if bgra.view(np.uint32).min() >= 0xFF000000:
        return
    glass = 255 - bgra[:, :, 3:4]
    out[...] = np.minimum(out.astype(np.uint16) + glass, 255).astype(np.uint8)


def _to_rgb_on_white(rgba: np.ndarray, size: tuple[int, int], out: np.ndarray) -> None:
    """Composite RGBA on white into ``out``: OpenSlide marks area without scanned data transparent."""
    import cv2

    if rgba.ndim == 2:
        rgba = np.repeat(rgba[:, :, None], 3, axis=2)
    if rgba.shape[:2] != (size[1], size[0]):
        raise SlideError(f"reader returned {rgba.shape[:2]} for a {size[1]}x{size[0]} region")
    if rgba.shape[2] == 3:
        out[...] = rgba
        return
    alpha = rgba[:, :, 3]
    if out.flags.c_contiguous:
        cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB, dst=out)
    else:
        out[...] = cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)
    if alpha.min() == 255:
        return
    a = alpha.astype(np.float32)[:, :, None] / 255.0
    out[...] = (rgba[:, :, :3].astype(np.float32) * a + 255.0 * (1.0 - a) + 0.5).astype(np.uint8)


# -------------------------------------------------------------------------------------------- MPP
_OME_SIZE = re.compile(r'PhysicalSizeX="([0-9.eE+-]+)"(?:[^>]*?PhysicalSizeXUnit="([^"]+)")?')
_UNIT_TO_UM = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


def _valid_mpp(value: Any) -> float | None:
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        return None
    return mpp if MIN_MPP <= mpp <= MAX_MPP and math.isfinite(mpp) else None


def _mpp_from_properties(props: dict[str, str]) -> tuple[float, str] | None:
    for key in ("openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP"):
        mpp = _valid_mpp(props.get(key))
        if mpp is not None:
            return mpp, f"metadata:{key}"
    return None


def _mpp_from_tiff_tags(path: Path) -> tuple[float, str] | None:
    """OME PhysicalSizeX, else TIFF XResolution with ResolutionUnit inch or centimetre."""
    import tifffile

    try:
        with quiet_tifffile(), tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            desc = page.description or ""
            match = _OME_SIZE.search(desc)
            if match:
                factor = _UNIT_TO_UM.get((match.group(2) or "µm").strip())
                mpp = _valid_mpp(float(match.group(1)) * factor) if factor else None
                if mpp is not None:
                    return mpp, "metadata:ome.PhysicalSizeX"
            tags = page.tags
            if "XResolution" in tags and "ResolutionUnit" in tags:
                num, den = tags["XResolution"].value
                unit = int(tags["ResolutionUnit"].value)
                if num and den and unit in (2, 3):
                    px_per_unit = num / den
                    um_per_unit = 25400.0 if unit == 2 else 10000.0
                    mpp = _valid_mpp(um_per_unit / px_per_unit)
                    if mpp is not None:
                        return mpp, "metadata:tiff.XResolution"
    except Exception:
        return None
    return None


# ------------------------------------------------------------------------------------------- open
def open_slide(path: str | Path, mpp_override: float | None = None, *, require_mpp: bool = True) -> Slide:
    """Open a whole-slide image, vetted and with its level-0 µm/px resolved.

    ``mpp_override`` wins over metadata (for slides whose metadata lacks or misstates it). A slide
    with no pixel size anywhere raises :class:`MissingMppError`, naming ``--mpp`` (unless
    ``require_mpp`` is False, as for ``fprotoseg info``: then ``mpp`` is NaN).
    """
    path = Path(path)
    if path.is_dir():  # a DICOM WSI series: OpenSlide opens one instance and finds the rest beside it
        from fprotoseg.worker.wsi.dicom import series_entry

        path = series_entry(path)
    if not path.is_file():
        raise SlideError(f"slide not found: {path}")
    file_size = path.stat().st_size
    if file_size == 0:
        raise EmptySlideError(f"{path.name} is empty (0 bytes)")
    if mpp_override is not None and _valid_mpp(mpp_override) is None:
        raise SlideError(
            f"--mpp {mpp_override} is not a plausible pixel size (expected {MIN_MPP}..{MAX_MPP} µm/px)"
        )
    with path.open("rb") as fh:
        magic = fh.read(4)
    is_tiff = magic in TIFF_MAGICS
    is_ome = vet_tiff(path, file_size) if is_tiff else False

    import openslide

    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception:
        fmt = None
    if fmt is not None and not (is_ome and fmt == "generic-tiff"):
        slide = _open_openslide(path, fmt, file_size)
    elif is_tiff:
        slide = _open_tiffslide(path, file_size)
    else:
        raise UnsupportedFormatError(
            f"{path.name} is not a whole-slide image format fprotoseg reads "
            "(Aperio SVS, Hamamatsu NDPI, MIRAX, Leica SCN, Philips TIFF, Ventana BIF, OME-TIFF, tiled TIFF, "
            "DICOM WSI: a folder of one series or one of its instances)"
        )
    try:
        _resolve_mpp(slide, mpp_override)
    except MissingMppError as exc:
        if require_mpp:
            slide.close()
            raise
        slide.mpp, slide.mpp_source = float("nan"), f"missing: {exc.message}"
    except BaseException:
        slide.close()
        raise
    return slide


def _open_openslide(path: Path, fmt: str, file_size: int) -> Slide:
    import openslide

    try:
        with quiet_tifffile():
            handle = openslide.OpenSlide(str(path))
    except Exception as exc:
        raise SlideError(f"{path.name} ({fmt}) cannot be opened: {one_line(exc)}") from exc
    props = dict(handle.properties)
    return _slide_from_handle(path, handle, "openslide", props.get("openslide.vendor", fmt), props, file_size)


def _open_tiffslide(path: Path, file_size: int) -> Slide:
    import tiffslide

    try:
        with quiet_tifffile():
            handle = tiffslide.TiffSlide(str(path))
    except Exception as exc:
        raise SlideError(f"{path.name} is not a readable whole-slide image: {one_line(exc)}") from exc
    props = {k: str(v) for k, v in handle.properties.items() if v is not None}
    vendor = props.get("tiffslide.vendor") or ("ome-tiff" if ".ome." in path.name.lower() else "tiff")
    return _slide_from_handle(path, handle, "tiffslide", vendor, props, file_size)


def _slide_from_handle(
    path: Path, handle: Any, reader: str, vendor: str, props: dict[str, str], file_size: int
) -> Slide:
    """Wrap an open OpenSlide/TiffSlide handle after the size guard; close it on any failure."""
    try:
        width, height = handle.dimensions
        check_dimensions(path, int(width), int(height), file_size)
        return Slide(
            path=path,
            reader=reader,
            vendor=vendor,
            width_px=int(width),
            height_px=int(height),
            mpp=0.0,
            mpp_source="",
            level_dimensions=tuple((int(w), int(h)) for w, h in handle.level_dimensions),
            level_downsamples=tuple(float(d) for d in handle.level_downsamples),
            properties=props,
            _handle=handle,
            _raw_read=_raw_openslide_reader(handle) if reader == "openslide" else None,
        )
    except BaseException:
        handle.close()
        raise


def _resolve_mpp(slide: Slide, mpp_override: float | None) -> None:
    if mpp_override is not None:
        slide.mpp, slide.mpp_source = float(mpp_override), "override"
        return
    found = _mpp_from_properties(slide.properties)
    if found is None:
        with slide.path.open("rb") as fh:
            is_tiff = fh.read(4) in TIFF_MAGICS
        found = _mpp_from_tiff_tags(slide.path) if is_tiff else None
    if found is None:
        raise MissingMppError(
            f"{slide.path.name} has no pixel size (µm/px) in its metadata", hint=MPP_HINT
        )
    slide.mpp, slide.mpp_source = found


def describe_levels(slide: Slide) -> Sequence[str]:
    """Human lines, one per level: size and µm/px (for ``fprotoseg info`` text output)."""
    return [
        f"level {i}: {w}x{h} px, downsample {slide.level_downsamples[i]:.3f}, {slide.level_mpp(i):.4f} µm/px"
        for i, (w, h) in enumerate(slide.level_dimensions)
    ]
