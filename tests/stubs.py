"""Deterministic test doubles and test-slide builders for the whole-slide pipeline.

The geometry tests need slides whose correct segmentation is known *and* whose pixels are real
H&E (so tissue detection, JPEG decoding and resampling behave as on real slides). The trick:
real tiles from ``../shared/data/patches`` are mosaicked into known shapes, and each shape's
class is encoded by a permutation of the tile's colour channels. In H&E the green channel is the
smallest almost everywhere (eosin and haematoxylin both absorb green); a permutation moves it to
channel ``k`` for class ``k``. Saturation (so tissue detection) is unchanged by a permutation.
:class:`ChannelStubSegmenter` labels each output pixel by the smallest channel after average
pooling: a known, per-pixel function of slide position that any swapped axis, wrong level
downsample or half-tile shift in the pipeline would visibly break.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fprotoseg.model.segmenter import TissueClass

STUB_CLASSES = (
    TissueClass("Tumor", (200, 0, 0)),
    TissueClass("Stroma", (150, 200, 150)),
    TissueClass("Necrosis", (50, 50, 200)),
)
# channel order that puts the original (smallest) green channel at index k
CLASS_PERMUTATIONS = ((1, 0, 2), (0, 1, 2), (0, 2, 1))

# Real H&E tiles (CRC-VAL-HE-7K, 224 px at 0.5 µm/px) with little glass inside.
TEXTURE_TILES = (
    "crc-val-he-7k/TUM-TCGA-GALLTCWV.png",
    "crc-val-he-7k/STR-TCGA-HGDYLEWM.png",
    "crc-val-he-7k/STR-TCGA-QRKEEQKW.png",
    "crc-val-he-7k/MUS-TCGA-MNCDQHID.png",
    "crc-val-he-7k/MUS-TCGA-YKIDGGHP.png",
    "crc-val-he-7k/TUM-TCGA-KECNIDCQ.png",
    "crc-val-he-7k/LYM-TCGA-KWWRKVQS.png",
)
TEXTURE_MPP = 0.5
GLASS_RGB = (242, 241, 244)


@dataclass
class ChannelStubSegmenter:
    """Implements the Segmenter protocol: one-hot of the smallest channel per pooled block."""

    classes: Sequence[TissueClass] = STUB_CLASSES
    mpp: float = 1.0
    tile_size_px: int = 224
    output_stride: int = 8
    name: str = "channel-stub"
    checksum_sha256: str = "0" * 64
    device: str = "cpu"
    precision: str = "fp32"
    calls: list[int] = field(default_factory=list)
    on_predict: Callable[[int], None] | None = None

    def predict(self, tiles_nhwc_uint8: np.ndarray) -> np.ndarray:
        n, h, w, _ = tiles_nhwc_uint8.shape
        s = self.output_stride
        pooled = tiles_nhwc_uint8.reshape(n, h // s, s, w // s, s, 3).mean(axis=(2, 4))
        smallest = pooled.argmin(axis=-1)  # (n, h/s, w/s)
        scores = np.zeros((n, len(self.classes), h // s, w // s), dtype=np.float32)
        for k in range(len(self.classes)):
            scores[:, k] = smallest == k
        self.calls.append(n)
        if self.on_predict is not None:
            self.on_predict(len(self.calls))
        return scores


# ------------------------------------------------------------------------------ known-shape slides
@dataclass(frozen=True)
class Shape:
    """A class region in µm: disk (cx, cy, r), rect (x0, y0, x1, y1), or polygon [(x, y), ...]."""

    class_index: int
    kind: str
    params: tuple
    hole: tuple | None = None  # rect (x0, y0, x1, y1) cut out of it


# Asymmetric on purpose (catches swapped axes): slide 1400 x 1000 µm.
SLIDE_SIZE_UM = (1400.0, 1000.0)
KNOWN_SHAPES = (
    Shape(0, "disk", (330.0, 330.0, 210.0)),
    Shape(1, "rect", (700.0, 120.0, 1250.0, 520.0), hole=(880.0, 240.0, 1040.0, 380.0)),
    Shape(2, "polygon", ((150.0, 650.0), (620.0, 620.0), (560.0, 930.0), (200.0, 900.0))),
    # Two classes sharing an edge (no glass between them).
    Shape(0, "rect", (780.0, 640.0, 1000.0, 900.0)),
    Shape(2, "rect", (1000.0, 640.0, 1260.0, 900.0)),
)


def render_truth(mpp: float, shapes: Sequence[Shape] = KNOWN_SHAPES, size_um=SLIDE_SIZE_UM) -> np.ndarray:
    """uint8 label raster at ``mpp`` (0 = glass, k + 1 = class k), pixel centres sampled."""
    import cv2

    w, h = math.ceil(size_um[0] / mpp), math.ceil(size_um[1] / mpp)
    truth = np.zeros((h, w), dtype=np.uint8)
    shift = 4  # cv2 sub-pixel bits
    one = 1 << shift

    def pts(coords_um: Sequence[tuple[float, float]]) -> np.ndarray:
        return np.array([[round((x / mpp - 0.5) * one), round((y / mpp - 0.5) * one)] for x, y in coords_um],
                        dtype=np.int32)

    for shape in shapes:
        layer = np.zeros_like(truth)
        if shape.kind == "disk":
            cx, cy, r = shape.params
            yy, xx = np.ogrid[:h, :w]
            layer[((xx + 0.5) * mpp - cx) ** 2 + ((yy + 0.5) * mpp - cy) ** 2 <= r * r] = 1
        elif shape.kind == "rect":
            x0, y0, x1, y1 = shape.params
            layer[_rect_slice(x0, y0, x1, y1, mpp)] = 1
        else:
            cv2.fillPoly(layer, [pts(shape.params)], 1, lineType=cv2.LINE_8, shift=shift)
        if shape.hole is not None:
            layer[_rect_slice(*shape.hole, mpp)] = 0
        truth[layer > 0] = shape.class_index + 1
    return truth


def _rect_slice(x0: float, y0: float, x1: float, y1: float, mpp: float) -> tuple[slice, slice]:
    """Pixels whose centres fall inside the µm rectangle."""
    return (
        slice(math.ceil(y0 / mpp - 0.5), math.ceil(y1 / mpp - 0.5)),
        slice(math.ceil(x0 / mpp - 0.5), math.ceil(x1 / mpp - 0.5)),
    )


def load_textures(patches_dir: Path) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(patches_dir / rel).convert("RGB")) for rel in TEXTURE_TILES]


def mosaic(
    textures: Sequence[np.ndarray], height_px: int, width_px: int, mpp: float, seed: int = 0
) -> np.ndarray:
    """An RGB canvas tiled with real H&E tiles resampled from 0.5 µm/px to ``mpp``."""
    import cv2

    rng = np.random.default_rng(seed)
    side = max(8, round(textures[0].shape[0] * TEXTURE_MPP / mpp))
    scaled = [
        cv2.resize(t, (side, side), interpolation=cv2.INTER_AREA if side < t.shape[0] else cv2.INTER_LINEAR)
        for t in textures
    ]
    canvas = np.empty((height_px, width_px, 3), dtype=np.uint8)
    for y in range(0, height_px, side):
        for x in range(0, width_px, side):
            tile = scaled[rng.integers(len(scaled))]
            tile = np.rot90(tile, int(rng.integers(4)))
            canvas[y : y + side, x : x + side] = tile[: height_px - y, : width_px - x]
    return canvas


def render_known_slide_rgb(patches_dir: Path, mpp: float) -> tuple[np.ndarray, np.ndarray]:
    """(RGB level-0 image, truth labels at the same mpp) for :data:`KNOWN_SHAPES`."""
    truth = render_truth(mpp)
    h, w = truth.shape
    textures = load_textures(patches_dir)
    rgb = np.empty((h, w, 3), dtype=np.uint8)
    rgb[:] = GLASS_RGB
    noise = np.random.default_rng(1).integers(-3, 4, size=(h, w, 1), dtype=np.int16)
    rgb = np.clip(rgb.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    for k, perm in enumerate(CLASS_PERMUTATIONS):
        sel = truth == k + 1
        if sel.any():
            canvas = mosaic(textures, h, w, mpp, seed=10 + k)[:, :, list(perm)]
            rgb[sel] = canvas[sel]
    return rgb, truth


def write_pyramid_tiff(
    path: Path,
    rgb: np.ndarray,
    mpp: float | None,
    levels: int,
    *,
    ome: bool = False,
    tile_px: int = 256,
    quality: int = 90,
) -> Path:
    """A tiled JPEG pyramid (levels downsampled 2x by area averaging).

    Plain TIFF: levels as consecutive IFDs (reduced ones with subfiletype 1), the layout
    OpenSlide reads as ``generic-tiff``; resolution tags in cm when ``mpp`` is given.
    OME-TIFF: levels in SubIFDs with PhysicalSizeX (read through tiffslide).
    """
    import cv2
    import tifffile

    pyramid = [rgb]
    for _ in range(levels - 1):
        prev = pyramid[-1]
        pyramid.append(cv2.resize(prev, (max(1, prev.shape[1] // 2), max(1, prev.shape[0] // 2)),
                                  interpolation=cv2.INTER_AREA))
    opts = {"tile": (tile_px, tile_px), "compression": "jpeg", "compressionargs": {"level": quality},
            "photometric": "rgb"}
    with tifffile.TiffWriter(path, bigtiff=False, ome=ome) as tif:
        for i, level in enumerate(pyramid):
            scale = level.shape[1] and rgb.shape[1] / level.shape[1]
            kwargs = dict(opts)
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * scale)
                kwargs.update(resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER")
            if ome:
                if i == 0:
                    meta = {"PhysicalSizeX": mpp, "PhysicalSizeXUnit": "µm",
                            "PhysicalSizeY": mpp, "PhysicalSizeYUnit": "µm"} if mpp else {}
                    tif.write(level, subifds=levels - 1, metadata={"axes": "YXS", **meta}, **kwargs)
                else:
                    tif.write(level, subfiletype=1, metadata=None, **kwargs)
            else:
                tif.write(level, subfiletype=0 if i == 0 else 1, metadata=None, **kwargs)
    return path


def write_claimed_size_tiff(path: Path, width_px: int, height_px: int) -> Path:
    """A tiny, well-formed TIFF header that claims a huge RGB image (a decompression bomb).

    One strip whose byte count is small: a reader that trusts the header would try to allocate
    width x height x 3 bytes.
    """
    entries = [
        (256, 4, 1, width_px),  # ImageWidth (LONG)
        (257, 4, 1, height_px),  # ImageLength
        (258, 3, 1, 8),  # BitsPerSample
        (259, 3, 1, 8),  # Compression = deflate
        (262, 3, 1, 2),  # Photometric = RGB
        (273, 4, 1, 0),  # StripOffsets (patched below)
        (277, 3, 1, 3),  # SamplesPerPixel
        (278, 4, 1, height_px),  # RowsPerStrip
        (279, 4, 1, 16),  # StripByteCounts
        (284, 3, 1, 1),  # PlanarConfiguration = contig
    ]
    ifd_offset = 8
    ifd_size = 2 + 12 * len(entries) + 4
    data_offset = ifd_offset + ifd_size
    entries = [(t, ty, c, data_offset if t == 273 else v) for t, ty, c, v in entries]
    out = bytearray(b"II*\x00" + struct.pack("<I", ifd_offset))
    out += struct.pack("<H", len(entries))
    for tag, typ, count, value in entries:
        packed = struct.pack("<HH", value, 0) if typ == 3 else struct.pack("<I", value)
        out += struct.pack("<HHI", tag, typ, count) + packed
    out += struct.pack("<I", 0)
    out += bytes(16)
    path.write_bytes(bytes(out))
    return path


# ------------------------------------------------------------------------------ pen ink on a slide
INK_TRANSMITTANCE_RGB = ((40, 160, 70), (30, 70, 190))  # a green and a blue marker


def draw_ink_strokes(rgb: np.ndarray, width_px: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """``rgb`` with a green and a blue marker stroke drawn across it (tissue and glass alike), and
    the uint8 stroke map (1 green, 2 blue). Ink is a filter over the tissue: transmitted light =
    tissue x ink transmittance. Placed at the same fractions of any slide's size."""
    import cv2

    h, w = rgb.shape[:2]

    def at(points: list[tuple[float, float]]) -> np.ndarray:
        return np.array([[round(x * w), round(y * h)] for x, y in points], np.int32)

    strokes = np.zeros((h, w), dtype=np.uint8)
    cv2.polylines(strokes, [at([(0.09, 0.10), (0.41, 0.24), (0.77, 0.20)])], False, 1, width_px)
    cv2.polylines(strokes, [at([(0.14, 0.74), (0.54, 0.84), (0.90, 0.71)])], False, 2, width_px)
    out = rgb.astype(np.float32)
    for value, ink_rgb in enumerate(INK_TRANSMITTANCE_RGB, start=1):
        out[strokes == value] *= np.array(ink_rgb, np.float32) / 255.0
    return out.astype(np.uint8), strokes


def write_dicom_series(source: Path, folder: Path) -> Path:
    """``source`` as a DICOM WSI series in ``folder`` (wsidicomizer, JPEG 2000 lossless, so the
    series holds the slide's own pixels; no label, overview or thumbnail). Made where it is needed,
    never stored: the DICOM tests and bench/cohort_study.py both take their series from here."""
    from wsidicom.codec import Jpeg2kSettings
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.sources import TiffSlideSource

    folder.mkdir(parents=True, exist_ok=True)
    WsiDicomizer.convert(
        source,
        folder,
        preferred_source=TiffSlideSource,
        encoding=Jpeg2kSettings(levels=[0]),
        include_label=False,
        include_overview=False,
        include_thumbnail=False,
        tile_size=256,
    )
    if not list(folder.glob("*.dcm")):
        raise RuntimeError(f"wsidicomizer wrote no instance for {source}")
    return folder
