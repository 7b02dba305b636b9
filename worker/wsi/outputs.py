"""The result files of one job (README.md, "Outputs"), written atomically (tmp file, then rename).

``segmentation.geojson`` (QuPath import rules), ``stats.json`` (areas from the label map, exact),
``mask.tiff`` (tiled pyramidal label TIFF with resolution tags and a colour palette),
``overlay.png`` (thumbnail with classes and a legend), ``provenance.json`` (built here from what
the pipeline did). The file names come from :mod:`fprotoseg.worker.wsi.result_files`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fprotoseg.worker.wsi.buffers import anonymous_array
from fprotoseg.worker.wsi.result_files import (
    GEOJSON_NAME,
    GZIP_SUFFIX,
    MASK_NAME,
    OVERLAY_NAME,
    PROVENANCE_NAME,
    STATS_NAME,
)
from fprotoseg.worker.wsi.vectorize import Region

if TYPE_CHECKING:
    from fprotoseg.model.segmenter import Segmenter
    from fprotoseg.worker.wsi.slide import Slide
    from fprotoseg.worker.wsi.tiling import TileGrid

__all__ = [
    "GEOJSON_NAME",
    "MASK_NAME",
    "OVERLAY_NAME",
    "PROVENANCE_NAME",
    "STATS_NAME",
    "build_provenance",
    "compute_stats",
    "write_geojson",
    "write_json",
    "write_mask_tiff",
    "write_overlay_png",
]


BACKGROUND_NAME = "Background"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> Path:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return path


# ---------------------------------------------------------------------------------------- geojson
def _feature_text(region: Region, classes: Sequence[Any]) -> str:
    import shapely

    cls = classes[region.class_index]
    props = {
        "objectType": "annotation",
        "classification": {"name": cls.name, "color": [int(v) for v in cls.color]},
        "measurements": {"area_um2": round(region.area_um2, 3)},
    }
    return (
        '{"type":"Feature","geometry":' + shapely.to_geojson(region.geometry)
        + ',"properties":' + json.dumps(props, separators=(",", ":"), ensure_ascii=False) + "}"
    )


def write_geojson(
    out_dir: Path, regions: Sequence[Region], classes: Sequence[Any], *, gzip_too: bool = False
) -> dict[str, Path]:
    """QuPath-importable FeatureCollection, one annotation per connected region, streamed.

    Feature by feature to the file (and its gzip twin): the text of a large slide's polygons never
    sits in memory whole. Geometry text comes from GEOS (``shapely.to_geojson``), not from Python
    lists per vertex.
    """
    path = out_dir / GEOJSON_NAME
    tmp = path.with_name(path.name + ".tmp")
    gz_path = out_dir / (GEOJSON_NAME + GZIP_SUFFIX)
    gz_tmp = gz_path.with_name(gz_path.name + ".tmp")
    with contextlib.ExitStack() as stack:
        sinks = [stack.enter_context(tmp.open("w", encoding="utf-8"))]
        if gzip_too:
            raw = stack.enter_context(gz_tmp.open("wb"))
            gz = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0))
            sinks.append(stack.enter_context(io.TextIOWrapper(gz, encoding="utf-8")))
        for sink in sinks:
            sink.write('{"type":"FeatureCollection","features":[')
        for i, region in enumerate(regions):
            text = ("," if i else "") + _feature_text(region, classes)
            for sink in sinks:
                sink.write(text)
        for sink in sinks:
            sink.write("]}")
    os.replace(tmp, path)
    files = {"geojson": path}
    if gzip_too:
        os.replace(gz_tmp, gz_path)
        files["geojson_gz"] = gz_path
    return files


# ------------------------------------------------------------------------------------------ stats
def label_counts(label_map: np.ndarray, rows_per_band: int = 256) -> np.ndarray:
    """Pixels per label value (256 bins), band by band: bincount widens its input to int64, which
    on a whole map would cost 8 bytes per pixel."""
    counts = np.zeros(256, dtype=np.int64)
    for r0 in range(0, label_map.shape[0], rows_per_band):
        counts += np.bincount(label_map[r0 : r0 + rows_per_band].ravel(), minlength=256)
    return counts


def compute_stats(
    label_map: np.ndarray,
    classes: Sequence[Any],
    region_counts: Sequence[int],
    *,
    output_mpp: float,
    slide_info: dict[str, Any],
    warnings: list[str],
) -> dict[str, Any]:
    """Areas are pixel counts x output_mpp² (exact); fractions are over tissue (labels > 0)."""
    counts = label_counts(label_map)[: len(classes) + 1]
    px_area_um2 = output_mpp * output_mpp
    tissue_px = int(counts[1:].sum())
    per_class = []
    for k, cls in enumerate(classes):
        px = int(counts[k + 1])
        per_class.append(
            {
                "name": cls.name,
                "color": [int(v) for v in cls.color],
                "label": k + 1,
                "pixel_count": px,
                "area_um2": px * px_area_um2,
                "area_mm2": px * px_area_um2 / 1e6,
                "fraction_of_tissue": (px / tissue_px) if tissue_px else 0.0,
                "region_count": int(region_counts[k]),
            }
        )
    return {
        "slide": slide_info,
        "output_mpp": output_mpp,
        "tissue_area_um2": tissue_px * px_area_um2,
        "tissue_area_mm2": tissue_px * px_area_um2 / 1e6,
        "classes": per_class,
        "warnings": warnings,
    }


# ------------------------------------------------------------------------------------------- mask
OME_NAMESPACE = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
LABEL_NAMES_NAMESPACE = "fprotoseg/labels/names"  # MapAnnotation: label value -> class name
LABEL_COLORS_NAMESPACE = "fprotoseg/labels/colors"  # MapAnnotation: label value -> #rrggbb
MICROMETRE = "&#181;m"  # "µm" as a character reference: a TIFF ASCII tag holds 7-bit text only


def ome_xml(
    shape: tuple[int, int],
    output_mpp: float,
    *,
    image_name: str,
    channel_names: Sequence[str],
    annotations: dict[str, dict[int, str]] | None = None,
    creator: str = "fprotoseg",
) -> str:
    """The OME-XML of one of our pyramidal OME-TIFFs: ``len(channel_names)`` uint8 planes of
    ``shape`` (h, w) at ``output_mpp`` µm/px, plane c in top-level IFD c, and MapAnnotations
    (namespace -> {key: value}).

    Why OME: Bio-Formats (QuPath, napari, Fiji) and tifffile read the physical pixel size from
    it, the channel names, and the reduced levels from the SubIFDs, so the file opens at the
    slide's scale.
    """
    from xml.sax.saxutils import quoteattr

    def entries(values: dict[int, str]) -> str:
        return "".join(f"<M K={quoteattr(str(k))}>{_xml_text(v)}</M>" for k, v in values.items())

    creator = creator.encode("ascii", "xmlcharrefreplace").decode()
    h, w = shape
    mpp = repr(float(output_mpp))
    channels = "".join(
        f'<Channel ID="Channel:0:{c}" Name={quoteattr(_xml_text(name))} SamplesPerPixel="1"/>'
        for c, name in enumerate(channel_names)
    )
    planes = "".join(
        f'<TiffData IFD="{c}" FirstC="{c}" FirstZ="0" FirstT="0" PlaneCount="1"/>'
        for c in range(len(channel_names))
    )
    maps = list((annotations or {}).items())
    refs = "".join(f'<AnnotationRef ID="Annotation:{i}"/>' for i in range(len(maps)))
    structured = "".join(
        f'<MapAnnotation ID="Annotation:{i}" Namespace="{namespace}"><Value>{entries(values)}</Value>'
        "</MapAnnotation>"
        for i, (namespace, values) in enumerate(maps)
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<OME xmlns="{OME_NAMESPACE}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        f'xsi:schemaLocation="{OME_NAMESPACE} {OME_NAMESPACE}/ome.xsd" Creator={quoteattr(creator)}>'
        f'<Image ID="Image:0" Name={quoteattr(image_name)}>'
        '<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint8" '
        f'SizeX="{w}" SizeY="{h}" SizeC="{len(channel_names)}" SizeZ="1" SizeT="1" '
        f'PhysicalSizeX="{mpp}" PhysicalSizeXUnit="{MICROMETRE}" PhysicalSizeY="{mpp}" '
        f'PhysicalSizeYUnit="{MICROMETRE}">'
        f"{channels}{planes}</Pixels>{refs}</Image>"
        + (f"<StructuredAnnotations>{structured}</StructuredAnnotations>" if maps else "")
        + "</OME>"
    )


def mask_ome_xml(
    shape: tuple[int, int], classes: Sequence[Any], output_mpp: float, creator: str = "fprotoseg"
) -> str:
    """The OME-XML of ``mask.tiff``: one uint8 plane of labels (0 = background, k + 1 = class k)
    with their names and colours as two MapAnnotations."""
    names = {0: BACKGROUND_NAME, **{k + 1: c.name for k, c in enumerate(classes)}}
    colors = {0: "#ffffff"}
    colors.update({k + 1: "#{:02x}{:02x}{:02x}".format(*map(int, c.color)) for k, c in enumerate(classes)})
    return ome_xml(
        shape, output_mpp, image_name="fprotoseg labels", channel_names=["labels"],
        annotations={LABEL_NAMES_NAMESPACE: names, LABEL_COLORS_NAMESPACE: colors}, creator=creator,
    )


def _xml_text(text: str) -> str:
    """Escaped, and 7-bit: a class name with a non-ASCII letter becomes a character reference."""
    from xml.sax.saxutils import escape

    return escape(text).encode("ascii", "xmlcharrefreplace").decode()


def _reduced_levels(plane: np.ndarray) -> list[np.ndarray]:
    """The SubIFD levels below ``plane``: halved (nearest neighbour: labels stay labels) until
    the longer side is at most 256 px; contiguous and outside the heap (tifffile would otherwise
    copy a strided view itself)."""
    levels: list[np.ndarray] = []
    prev = plane
    while max(prev.shape) > 256:
        level = anonymous_array(((prev.shape[0] + 1) // 2, (prev.shape[1] + 1) // 2), np.uint8)
        level[:] = prev[::2, ::2]
        levels.append(level)
        prev = level
    return levels


def write_ome_pyramid(
    path: Path,
    planes: Sequence[np.ndarray],
    description: str,
    output_mpp: float,
    colormap: np.ndarray | None = None,
) -> Path:
    """The one OME-TIFF writer: each uint8 (h, w) plane (a channel) in its own top-level IFD,
    tiled 256 px, zlib, with its reduced levels in SubIFDs and resolution tags at ``output_mpp``;
    ``description`` is the OME-XML (:func:`ome_xml`); ``colormap`` makes the planes palette images.

    One plane at a time, its levels built from it: the planes may be disk-backed (a memmap), and
    memory holds only the current plane's reduced levels (a third of a plane) at once.
    """
    import tifffile

    px_per_cm = 1e4 / output_mpp
    tmp = path.with_name(path.name + ".tmp")
    opts: dict[str, Any] = {"tile": (256, 256), "compression": "zlib", "resolutionunit": "CENTIMETER"}
    if colormap is not None:
        opts.update(photometric="palette", colormap=colormap)
    else:
        opts.update(photometric="minisblack")
    big = sum(p.size for p in planes) > 2**31
    with tifffile.TiffWriter(tmp, bigtiff=big) as tif:
        for c, plane in enumerate(planes):
            levels = _reduced_levels(plane)
            tif.write(
                plane,
                subifds=len(levels),
                resolution=(px_per_cm, px_per_cm),
                description=description if c == 0 else None,
                metadata=None,
                **opts,
            )
            for i, level in enumerate(levels, start=1):
                scale = 2**i
                tif.write(
                    level, subfiletype=1, resolution=(px_per_cm / scale, px_per_cm / scale),
                    metadata=None, **opts,
                )
            del levels
    os.replace(tmp, path)
    return path


def write_mask_tiff(path: Path, label_map: np.ndarray, classes: Sequence[Any], output_mpp: float) -> Path:
    """OME-TIFF: tiled pyramidal uint8 (levels in SubIFDs, nearest-neighbour), palette + resolution
    tags, OME-XML (physical pixel size, label names and colours: :func:`mask_ome_xml`).

    Values: 0 = background, k + 1 = class k; the palette colours them for any TIFF viewer.
    """
    colormap = np.zeros((3, 256), dtype=np.uint16)
    colormap[:, 0] = 255 * 257  # background white
    for k, cls in enumerate(classes):
        colormap[:, k + 1] = [int(v) * 257 for v in cls.color]
    description = mask_ome_xml(label_map.shape[:2], classes, output_mpp, f"fprotoseg {own_version()}")
    return write_ome_pyramid(path, [label_map], description, output_mpp, colormap)


def own_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("fprotoseg")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------- overlay
# Every class must read over H&E: the blend moves a pixel by alpha x |class colour - pixel|, so a
# pale class over tissue of a similar tone (Stroma's pale green over pink stroma) needs more alpha
# than a saturated one. Each class gets the alpha that moves the tissue under it by
# OVERLAY_MIN_CONTRAST_RGB on average (Euclidean RGB distance), within these bounds.
OVERLAY_MIN_CONTRAST_RGB = 70.0
OVERLAY_ALPHA_RANGE = (0.45, 0.85)
OVERLAY_OUTLINE_DARKEN = 0.55  # class boundaries in a darker shade: visible on glass and on tissue


def overlay_alphas(thumbnail_rgb: np.ndarray, labels: np.ndarray, colors: Sequence[Any]) -> np.ndarray:
    """Per label value (0 = glass, k + 1 = class k), the blend weight that keeps class k legible.

    The mean distance is taken over every other pixel in both directions: a quarter of the
    thumbnail's millions of pixels gives the same mean to well under 1%, at a quarter the cost.
    """
    lo, hi = OVERLAY_ALPHA_RANGE
    alphas = np.full(256, lo, dtype=np.float32)
    thumbnail_rgb, labels = thumbnail_rgb[::2, ::2], labels[::2, ::2]
    for k, color in enumerate(colors):
        under = thumbnail_rgb[labels == k + 1]
        if under.size == 0:
            continue
        offset = under.astype(np.float32) - np.asarray(color, np.float32)
        distance = float(np.linalg.norm(offset, axis=1).mean())
        alphas[k + 1] = min(hi, max(lo, OVERLAY_MIN_CONTRAST_RGB / max(distance, 1e-6)))
    return alphas


def write_overlay_png(
    path: Path,
    thumbnail_rgb: np.ndarray,
    label_map: np.ndarray,
    classes: Sequence[Any],
    stats: dict[str, Any],
) -> Path:
    """The thumbnail with classes blended over tissue (alpha per class: :func:`overlay_alphas`),
    darker class outlines, and a legend (name, colour, % of tissue)."""
    import cv2
    from PIL import Image, ImageDraw, ImageFont

    th, tw = thumbnail_rgb.shape[:2]
    labels = cv2.resize(label_map, (tw, th), interpolation=cv2.INTER_NEAREST)
    palette = np.zeros((256, 3), dtype=np.uint8)
    for k, cls in enumerate(classes):
        palette[k + 1] = cls.color
    # Everything below is per label value, then looked up per pixel: the blend is one fixed-point
    # multiply-add (weights in 1/256) instead of float arrays the size of the thumbnail.
    colored = cv2.LUT(cv2.merge([labels, labels, labels]), palette.reshape(256, 1, 3))
    weights = np.round(overlay_alphas(thumbnail_rgb, labels, [c.color for c in classes]) * 256)
    weights[0] = 0  # glass keeps the thumbnail's own pixels
    weight = cv2.LUT(labels, weights.clip(0, 255).astype(np.uint8))[..., None].astype(np.uint16)
    blend = ((thumbnail_rgb * (256 - weight) + colored * weight + 128) >> 8).astype(np.uint8)
    # Class boundaries drawn solid (darker) so small regions and pale classes stay visible.
    edges = cv2.morphologyEx(labels, cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
    edges &= labels > 0
    blend[edges] = (colored[edges] * OVERLAY_OUTLINE_DARKEN).astype(np.uint8)
    image = Image.fromarray(blend)

    font = ImageFont.load_default()
    rows = [(BACKGROUND_NAME + " / glass", (255, 255, 255), None)]
    rows = [(c["name"], tuple(c["color"]), c["fraction_of_tissue"]) for c in stats["classes"]] + rows
    line_h, pad, swatch = 16, 6, 12
    legend_w = 220
    legend_h = pad * 2 + line_h * (len(rows) + 1)
    canvas = Image.new("RGB", (tw + legend_w, max(th, legend_h)), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    x0 = tw + pad
    draw.text((x0, pad), f"tissue {stats['tissue_area_mm2']:.2f} mm2", fill=(0, 0, 0), font=font)
    for i, (name, color, frac) in enumerate(rows, start=1):
        y = pad + i * line_h
        draw.rectangle([x0, y + 2, x0 + swatch, y + 2 + swatch], fill=color, outline=(0, 0, 0))
        label = name if frac is None else f"{name}  {100 * frac:.1f}%"
        draw.text((x0 + swatch + 6, y + 2), label, fill=(0, 0, 0), font=font)
    tmp = path.with_name(path.name + ".tmp")
    canvas.save(tmp, format="PNG", compress_level=1)  # 4x faster than the default, ~20% larger
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------- provenance
def software_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in (
        "fprotoseg",
        "numpy",
        "torch",
        "openslide-python",
        "openslide-bin",
        "tiffslide",
        "tifffile",
        "opencv-python-headless",
        "shapely",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _utc(ts_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts_s))


def build_provenance(
    *,
    slide: Slide,
    slide_path: Path,
    slide_sha256: str,
    grid: TileGrid,
    segmenter: Segmenter,
    classes: Sequence[Any],
    tissue_info: dict[str, Any],
    label_map_shape: tuple[int, ...],
    small_regions_absorbed: int,
    options: dict[str, Any],
    timings_s: dict[str, float],
    started_at_s: float,
    warnings: list[str],
    roi: dict[str, Any] | None = None,
    stain_norm: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``provenance.json``: the slide and how it was read, the model, tiles, timings, software,
    the region of interest when one was given (``roi``: geometry as sent, area on the slide), and
    the stain normalisation applied when the model asks for one (``model.stain_norm``)."""
    software = software_versions()
    provenance: dict[str, Any] = {
        "fprotoseg_version": software.get("fprotoseg", "unknown"),
        "started_at": _utc(started_at_s),
        "finished_at": _utc(time.time()),
        "slide": {
            **slide.metadata(),
            "path": str(slide_path),
            "sha256": slide_sha256,
            "size_bytes": slide_path.stat().st_size,
        },
        "read": {
            "level": grid.level,
            "level_mpp": grid.level_mpp,
            "level_downsample": grid.level_mpp / slide.mpp,
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
        },
        "model": {
            "name": segmenter.name,
            "checksum_sha256": segmenter.checksum_sha256,
            "classes": [{"name": c.name, "color": list(c.color)} for c in classes],
            "mpp": float(segmenter.mpp),
            "tile_size_px": int(segmenter.tile_size_px),
            "output_stride": int(segmenter.output_stride),
            "device": segmenter.device,
            "precision": segmenter.precision,
            **({"stain_norm": stain_norm} if stain_norm is not None else {}),
        },
        "tissue": tissue_info,
        "tiles": {
            "grid_rows": grid.grid_rows,
            "grid_cols": grid.grid_cols,
            "grid_total": grid.grid_total,
            "inferred": len(grid.tiles),
            "skipped_no_tissue": grid.grid_total - len(grid.tiles),
            "tile_size_px": grid.tile_size_px,
            "margin_px": grid.margin_px,
            "step_px": grid.step_px,
        },
        "output": {
            "mpp": options["output_mpp"],
            "label_map_shape": list(label_map_shape),
            "small_regions_absorbed": small_regions_absorbed,
        },
        "options": dict(options),
        "timings_s": {k: round(v, 4) for k, v in timings_s.items()},
        "software": software,
        "platform": {"system": platform.platform(), "machine": platform.machine()},
        "warnings": warnings,
    }
    if roi is not None:
        provenance["roi"] = roi
    provenance["timings_s"]["total"] = round(time.time() - started_at_s, 4)
    return provenance
