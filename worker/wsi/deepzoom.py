"""What the result viewer (``GET /jobs/{id}/view``) shows, rendered by the worker: Deep Zoom pyramids.

Why here and not in the API: the API image has no OpenSlide, so it cannot read the slide. The
worker renders, once per job, a Deep Zoom pyramid (the DZI format OpenSeadragon reads) of the slide
at the output resolution and one pyramid per class (its colour where the label map holds the class,
transparent elsewhere), so the page can toggle classes by layer opacity. The label map is read back
from the published ``mask.tiff`` (the same labels the stats and polygons come from) and the
classes from ``stats.json``; the slide is opened again here, so the slide pipeline needs no change.

Two QC layers lie over the classes, rendered from the per-pixel files beside the mask
(:mod:`~fprotoseg.worker.wsi.pixel_maps`): ``artefacts`` (each artefact QC left out in its own
colour, :data:`ARTEFACT_COLOURS_RGB`) and ``confidence`` (the chosen class's probability through
:data:`CONFIDENCE_RAMP`, red where the network was unsure). Both are halved by nearest neighbour:
their values are codes and probabilities, not intensities to average with glass.

Class tiles that hold no pixel of their class are not written (most of a slide is glass or another
class); the API answers them with a transparent tile (:data:`VIEWER_BLANK_TILE` rule in
``result_files``). Memory: the slide at the output resolution as RGB plus one byte per output pixel
per layer being written (a 100k x 80k px slide at 0.25 µm/px and 2 µm/px output: about 0.5 GB).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fprotoseg.worker.wsi.buffers import anonymous_array
from fprotoseg.worker.wsi.confidence import LOW_CONFIDENCE
from fprotoseg.worker.wsi.qc_regions import ARTEFACT_BITS
from fprotoseg.worker.wsi.result_files import (
    ARTEFACTS_NAME,
    CONFIDENCE_NAME,
    MASK_NAME,
    STATS_NAME,
    VIEWER_DIR,
    VIEWER_MANIFEST,
    VIEWER_QC_LAYERS,
    VIEWER_SLIDE_LAYER,
    VIEWER_TILE_PX,
    viewer_class_layer,
)

SLIDE_JPEG_QUALITY = 85
# The QC layers' colours (the page's legend reads them from viewer.json; bench/qc_picture.py too).
# A pixel with several artefacts shows the first in this order: the specific ones before blur, which
# is judged per 64 µm block (ink over a blurred area is still ink).
ARTEFACT_COLOURS_RGB: dict[str, tuple[int, int, int]] = {
    "pen_ink": (230, 0, 200),
    "fold": (255, 80, 0),
    "over_exposed": (0, 200, 255),
    "out_of_focus": (255, 210, 0),
}
# Confidence (softmax probability of the chosen class) -> colour, linear between the stops: red
# when unsure, pale yellow at the stats' low-confidence cut, blue when sure (ColorBrewer RdYlBu).
CONFIDENCE_RAMP: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (0.0, (215, 48, 39)),
    (LOW_CONFIDENCE, (255, 255, 191)),
    (1.0, (69, 117, 180)),
)


def deepzoom_level_count(width_px: int, height_px: int) -> int:
    """Levels 0 (1x1 px) .. max (full size), as the Deep Zoom format defines them."""
    return math.ceil(math.log2(max(width_px, height_px, 1))) + 1


def _dzi_xml(width_px: int, height_px: int, fmt: str) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<Image xmlns="http://schemas.microsoft.com/deepzoom/2008" Format="{fmt}" '
        f'Overlap="0" TileSize="{VIEWER_TILE_PX}"><Size Width="{width_px}" Height="{height_px}"/></Image>\n'
    )


def _halve(image: np.ndarray) -> np.ndarray:
    """The next coarser Deep Zoom level: ceil(size / 2), area-averaged (smooth edges, exact means)."""
    import cv2

    h, w = image.shape[:2]
    return cv2.resize(image, (max(1, (w + 1) // 2), max(1, (h + 1) // 2)), interpolation=cv2.INTER_AREA)


def _halve_nearest(image: np.ndarray) -> np.ndarray:
    """The next coarser level by nearest neighbour (every other pixel): codes stay codes."""
    return np.ascontiguousarray(image[::2, ::2])


def _write_pyramid(
    image: np.ndarray, dst: Path, name: str, fmt: str, encode: Any, keep: Any = None, halve: Any = _halve
) -> int:
    """``name.dzi`` and ``name_files/<level>/<col>_<row>.<fmt>``; returns the tile files written.

    ``encode(tile) -> bytes``; ``keep(tile) -> bool`` skips empty tiles when given; ``halve``
    makes the next coarser level.
    """
    height, width = image.shape[:2]
    (dst / f"{name}.dzi").write_text(_dzi_xml(width, height, fmt))
    written = 0
    level_image = image
    for level in range(deepzoom_level_count(width, height) - 1, -1, -1):
        level_dir = dst / f"{name}_files" / str(level)
        level_dir.mkdir(parents=True, exist_ok=True)
        lh, lw = level_image.shape[:2]
        for row in range(math.ceil(lh / VIEWER_TILE_PX)):
            for col in range(math.ceil(lw / VIEWER_TILE_PX)):
                y, x = row * VIEWER_TILE_PX, col * VIEWER_TILE_PX
                tile = level_image[y : y + VIEWER_TILE_PX, x : x + VIEWER_TILE_PX]
                if keep is not None and not keep(tile):
                    continue
                (level_dir / f"{col}_{row}.{fmt}").write_bytes(encode(tile))
                written += 1
        if level:
            level_image = halve(level_image)
    return written


def _encode_jpeg(rgb: np.ndarray) -> bytes:
    import cv2

    ok, data = cv2.imencode(
        ".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, SLIDE_JPEG_QUALITY]
    )
    if not ok:
        raise RuntimeError("JPEG encoding of a viewer tile failed")
    return bytes(data)


def _class_encoder(color_rgb: Sequence[int]) -> Any:
    """Tiles of one class: its colour everywhere, coverage (0..255) as alpha."""
    import cv2

    bgr = np.array([int(color_rgb[2]), int(color_rgb[1]), int(color_rgb[0])], dtype=np.uint8)

    def encode(alpha: np.ndarray) -> bytes:
        bgra = np.empty((*alpha.shape, 4), dtype=np.uint8)
        bgra[..., :3] = bgr
        bgra[..., 3] = alpha
        ok, data = cv2.imencode(".png", bgra, [cv2.IMWRITE_PNG_COMPRESSION, 3])
        if not ok:
            raise RuntimeError("PNG encoding of a viewer tile failed")
        return bytes(data)

    return encode


def _lut_encoder(lut_rgba: np.ndarray) -> Any:
    """Tiles of a uint8 map coloured through a 256-entry RGBA table (alpha 0: transparent)."""
    import cv2

    lut_bgra = np.ascontiguousarray(lut_rgba[:, [2, 1, 0, 3]])

    def encode(values: np.ndarray) -> bytes:
        ok, data = cv2.imencode(".png", lut_bgra[values], [cv2.IMWRITE_PNG_COMPRESSION, 3])
        if not ok:
            raise RuntimeError("PNG encoding of a viewer tile failed")
        return bytes(data)

    return encode


def artefact_lut() -> np.ndarray:
    """RGBA per artefact-bit value: the colour of its first artefact in ARTEFACT_COLOURS_RGB order."""
    lut = np.zeros((256, 4), dtype=np.uint8)
    for value in range(1, 256):
        name = next((n for n in ARTEFACT_COLOURS_RGB if value & ARTEFACT_BITS[n]), None)
        if name is not None:
            lut[value] = (*ARTEFACT_COLOURS_RGB[name], 255)
    return lut


def confidence_lut() -> np.ndarray:
    """RGBA per stored confidence (probability x 255): :data:`CONFIDENCE_RAMP`; 0 (not scored)
    transparent."""
    stops = np.array([p for p, _ in CONFIDENCE_RAMP]) * 255
    lut = np.zeros((256, 4), dtype=np.uint8)
    values = np.arange(256, dtype=np.float64)
    for c in range(3):
        lut[:, c] = np.rint(np.interp(values, stops, [rgb[c] for _, rgb in CONFIDENCE_RAMP]))
    lut[1:, 3] = 255
    return lut


def _write_qc_layers(out_dir: Path, tmp: Path, shape: tuple[int, int]) -> tuple[list[dict[str, Any]], int]:
    """The confidence and artefact layers from ``confidence.tiff`` and ``artefacts.tiff`` (results
    older than those files have none); returns (their manifest entries, tiles written)."""
    import tifffile

    layers: list[dict[str, Any]] = []
    tiles = 0
    sources: dict[str, tuple[str, np.ndarray, dict[str, Any]]] = {
        "confidence": (CONFIDENCE_NAME, confidence_lut(), {
            "ramp": [{"at": p, "color": list(rgb)} for p, rgb in CONFIDENCE_RAMP],
            "low_confidence": LOW_CONFIDENCE,
        }),
        "artefacts": (ARTEFACTS_NAME, artefact_lut(), {
            "legend": [
                {"name": n, "bit": ARTEFACT_BITS[n], "color": list(rgb)}
                for n, rgb in ARTEFACT_COLOURS_RGB.items()
            ],
        }),
    }
    for layer in VIEWER_QC_LAYERS:
        name, lut, extra = sources[layer]
        if not (out_dir / name).is_file():
            continue
        values = tifffile.imread(out_dir / name, level=0)
        if values.shape != shape:
            continue  # not on the label map's grid: not shown rather than misplaced
        tiles += _write_pyramid(values, tmp, layer, "png", _lut_encoder(lut), keep=lambda t: bool(t.any()),
                                halve=_halve_nearest)
        layers.append({"layer": layer, **extra})
        del values
    return layers, tiles


def _slide_at_label_resolution(
    slide_path: Path, mpp_override: float | None, output_mpp: float, shape: tuple[int, int]
) -> tuple[np.ndarray, dict[str, Any]]:
    """The slide as RGB at the label map's pixel grid (``shape`` = its rows, cols)."""
    import cv2

    from fprotoseg.worker.wsi.slide import open_slide

    with open_slide(slide_path, mpp_override=mpp_override) as slide:
        _, _, _, (sh, sw) = slide.scaled_geometry(output_mpp)
        scaled = anonymous_array((sh, sw, 3), np.uint8)
        for y, x, tile in slide.iter_scaled(output_mpp):
            scaled[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
        info = {"width": slide.width_px, "height": slide.height_px, "mpp": slide.mpp}
    rows, cols = shape
    if (sh, sw) == (rows, cols):
        return scaled, info
    # The label grid is ceil(level-0 size x mpp / output_mpp); the reader's integer box factor can
    # differ from it by a pixel or a fraction of a percent: map one onto the other.
    return cv2.resize(scaled, (cols, rows), interpolation=cv2.INTER_AREA), info


def write_viewer(out_dir: Path, slide_path: Path, *, mpp_override: float | None = None) -> Path:
    """Render ``out_dir/viewer/`` from the result files already in ``out_dir``; returns the manifest.

    Written into a temporary folder and renamed, so a half-written viewer never looks complete.
    """
    import tifffile

    started = time.perf_counter()
    stats = json.loads((out_dir / STATS_NAME).read_text())
    output_mpp = float(stats["output_mpp"])
    labels = tifffile.imread(out_dir / MASK_NAME, level=0)
    rows, cols = labels.shape
    final = out_dir / VIEWER_DIR
    tmp = out_dir / (VIEWER_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    rgb, slide_info = _slide_at_label_resolution(slide_path, mpp_override, output_mpp, (rows, cols))
    tiles = _write_pyramid(rgb, tmp, VIEWER_SLIDE_LAYER, "jpeg", _encode_jpeg)
    del rgb
    layers = []
    alpha = anonymous_array((rows, cols), np.uint8)
    for entry in stats["classes"]:
        label = int(entry["label"])
        np.multiply(labels == label, 255, out=alpha, casting="unsafe")
        name = viewer_class_layer(label)
        tiles += _write_pyramid(
            alpha, tmp, name, "png", _class_encoder(entry["color"]), keep=lambda t: bool(t.any())
        )
        layers.append({"layer": name, "label": label, "name": entry["name"], "color": entry["color"]})
    del alpha
    qc_layers, qc_tiles = _write_qc_layers(out_dir, tmp, (rows, cols))
    tiles += qc_tiles
    manifest = {
        "format": "fprotoseg-viewer/1",
        "width_px": cols,
        "height_px": rows,
        "tile_px": VIEWER_TILE_PX,
        "levels": deepzoom_level_count(cols, rows),
        "output_mpp": output_mpp,
        # level-0 slide pixels per viewer pixel: GeoJSON coordinates are level-0 pixels
        "level0_px_per_viewer_px": output_mpp / float(slide_info["mpp"]),
        "slide_width_px": slide_info["width"],
        "slide_height_px": slide_info["height"],
        "slide_layer": VIEWER_SLIDE_LAYER,
        "class_layers": layers,
        "qc_layers": qc_layers,  # drawn over the classes in this order; hidden until asked for
        "tile_files": tiles,
        "render_s": round(time.perf_counter() - started, 3),
    }
    (tmp / os.path.basename(VIEWER_MANIFEST)).write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return final / os.path.basename(VIEWER_MANIFEST)
