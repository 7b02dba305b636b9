"""A region of interest: the part of a slide a pathologist drew (in QuPath, say) and wants measured.

Two halves, because two processes use them:

- :func:`parse_roi` and :func:`check_roi_on_slide` are stdlib only. The API calls them on
  ``POST /segment`` (its image has no numpy or shapely), so a malformed, empty or off-slide ROI is
  refused before a job exists. They check structure: GeoJSON types, finite numbers, closed rings of
  at least four positions, non-zero area, a vertex cap.
- :class:`RoiGeometry` (shapely, OpenCV: the worker only) checks what structure cannot
  (self-intersections), clips the ROI to the slide and applies it to the pipeline: the tissue mask
  is cut to it before tiles are planned (so only tiles touching it are read and inferred), the
  label map is cut to it exactly at the output resolution (so areas and fractions are within it),
  and the polygons are intersected with it.

Coordinates are level-0 pixels of the slide, x right and y down, as QuPath exports annotations.
Accepted: a Polygon or MultiPolygon geometry, a Feature holding one, a FeatureCollection (or the
JSON array of Features older QuPath versions export) whose polygonal features are united.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fprotoseg.worker.errors import RoiError

if TYPE_CHECKING:
    import numpy as np

    from fprotoseg.worker.wsi.tissue import TissueMask
    from fprotoseg.worker.wsi.vectorize import Region

__all__ = [
    "MAX_ROI_BYTES",
    "MAX_ROI_VERTICES",
    "Roi",
    "RoiGeometry",
    "check_roi_on_slide",
    "load_roi_file",
    "parse_roi",
]

MAX_ROI_BYTES = 512 * 1024  # the GeoJSON text: a QuPath polygon of ~20,000 vertices
MAX_ROI_VERTICES = 100_000
# A coordinate beyond any real slide (level-0 px): a unit error (µm, mm) or garbage.
MAX_COORDINATE_PX = 10_000_000

Ring = tuple[tuple[float, float], ...]
PolygonRings = tuple[Ring, ...]  # exterior first, then holes


@dataclass(frozen=True)
class Roi:
    """A parsed ROI: polygons (exterior ring, then holes) in level-0 px; structure checked."""

    polygons: tuple[PolygonRings, ...]

    @property
    def vertex_count(self) -> int:
        return sum(len(ring) for polygon in self.polygons for ring in polygon)

    @property
    def bounds_px(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the exterior rings."""
        xs = [x for polygon in self.polygons for x, _ in polygon[0]]
        ys = [y for polygon in self.polygons for _, y in polygon[0]]
        return min(xs), min(ys), max(xs), max(ys)

    def to_geojson(self) -> dict[str, Any]:
        """The ROI as one MultiPolygon geometry (what provenance and the job record keep)."""
        return {
            "type": "MultiPolygon",
            "coordinates": [[[list(p) for p in ring] for ring in polygon] for polygon in self.polygons],
        }


def _fail(detail: str) -> RoiError:
    return RoiError(f"invalid ROI: {detail}")


def _position(value: Any) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) < 2:
        raise _fail("a position must be an [x, y] pair of numbers")
    xy = []
    for v in value[:2]:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _fail("coordinates must be finite numbers (level-0 pixels)")
        if abs(v) > MAX_COORDINATE_PX:
            raise _fail(f"coordinate {v:g} is beyond any slide (level-0 pixels expected, not µm or mm)")
        xy.append(float(v))
    return xy[0], xy[1]


def _ring_area_px2(ring: Ring) -> float:
    """Shoelace area (unsigned)."""
    s = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(ring):
        s += x0 * y1 - x1 * y0
    return abs(s) / 2


def _polygon(value: Any) -> PolygonRings:
    if not isinstance(value, list) or not value:
        raise _fail("a Polygon needs at least one ring of positions")
    rings = []
    for raw in value:
        if not isinstance(raw, list):
            raise _fail("a ring must be a list of [x, y] positions")
        ring = tuple(_position(p) for p in raw)
        if len(ring) < 4:
            raise _fail(f"a ring needs at least 4 positions (first = last), not {len(ring)}")
        if ring[0] != ring[-1]:
            raise _fail("a ring must be closed (its last position equal to its first)")
        rings.append(ring)
    if _ring_area_px2(rings[0]) <= 0:
        raise _fail("a polygon has no area (all its points on one line)")
    return tuple(rings)


def _geometry(value: Any) -> list[PolygonRings]:
    if not isinstance(value, dict):
        raise _fail("expected a GeoJSON object")
    kind = value.get("type")
    coordinates = value.get("coordinates")
    if kind == "Polygon":
        return [_polygon(coordinates)]
    if kind == "MultiPolygon":
        if not isinstance(coordinates, list):
            raise _fail("a MultiPolygon's coordinates must be a list of polygons")
        return [_polygon(c) for c in coordinates]
    if kind == "GeometryCollection":
        members = value.get("geometries")
        if not isinstance(members, list):
            raise _fail("a GeometryCollection needs a list of geometries")
        return [p for g in members for p in _geometry(g)]
    raise _fail(f"a {kind!r} geometry has no area; draw a Polygon or MultiPolygon")


def _features(items: Any) -> list[PolygonRings]:
    if not isinstance(items, list):
        raise _fail("a FeatureCollection needs a list of features")
    polygons: list[PolygonRings] = []
    for item in items:
        if not isinstance(item, dict) or item.get("type") != "Feature":
            raise _fail("every member of a FeatureCollection must be a Feature")
        polygons.extend(_geometry(item.get("geometry")))
    return polygons


def parse_roi(doc: Any) -> Roi:
    """A GeoJSON ROI (parsed, or its JSON text) checked for structure; raises RoiError."""
    if isinstance(doc, (str, bytes)):
        if len(doc) > MAX_ROI_BYTES:
            raise _fail(f"the GeoJSON is larger than {MAX_ROI_BYTES // 1024} KiB")
        try:
            doc = json.loads(doc)
        except ValueError:
            raise _fail("not JSON text (GeoJSON expected)") from None
    if isinstance(doc, list):  # QuPath 0.2 exports an array of Features
        polygons = _features(doc)
    elif isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        polygons = _features(doc.get("features"))
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        polygons = _geometry(doc.get("geometry"))
    else:
        polygons = _geometry(doc)
    if not polygons:
        raise _fail("it holds no polygon")
    roi = Roi(tuple(polygons))
    if roi.vertex_count > MAX_ROI_VERTICES:
        raise _fail(f"{roi.vertex_count} vertices; at most {MAX_ROI_VERTICES} (simplify it in QuPath)")
    return roi


def load_roi_file(path: Any) -> Roi:
    """The ROI in a GeoJSON file (the CLI's ``--roi FILE``)."""
    from pathlib import Path

    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_ROI_BYTES:
            raise _fail(f"{path.name} is larger than {MAX_ROI_BYTES // 1024} KiB")
        text = path.read_text(encoding="utf-8-sig")  # QuPath on Windows may write a BOM
    except OSError as exc:
        raise RoiError(f"cannot read the ROI file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _fail(f"{path.name} is not UTF-8 text") from None
    return parse_roi(text)


def check_roi_on_slide(roi: Roi, width_px: int, height_px: int) -> None:
    """RoiError unless the ROI's outline overlaps the slide (level-0 ``width_px`` x ``height_px``)."""
    x0, y0, x1, y1 = roi.bounds_px
    if x1 <= 0 or y1 <= 0 or x0 >= width_px or y0 >= height_px:
        raise RoiError(
            f"invalid ROI: it lies outside the slide (x {x0:g}..{x1:g}, y {y0:g}..{y1:g}; the slide is "
            f"{width_px} x {height_px} level-0 px)"
        )


# ------------------------------------------------------------------------------- the worker's half
@dataclass(frozen=True)
class RoiGeometry:
    """The ROI as a valid shapely geometry clipped to the slide, and what the pipeline does with it."""

    geometry: Any  # shapely Polygon | MultiPolygon, level-0 px
    source: Roi

    @classmethod
    def on_slide(cls, roi: Roi, width_px: int, height_px: int) -> RoiGeometry:
        """Checked (valid rings, not off the slide) and clipped to the slide; raises RoiError."""
        import shapely
        from shapely.geometry import MultiPolygon, Polygon

        check_roi_on_slide(roi, width_px, height_px)
        parts = [Polygon(p[0], p[1:]) for p in roi.polygons]
        for part in parts:
            if not part.is_valid:
                raise _fail(f"the polygon is not valid ({shapely.is_valid_reason(part)})")
        geometry = shapely.union_all(parts) if len(parts) > 1 else parts[0]
        clipped = _polygonal(geometry.intersection(shapely.box(0, 0, width_px, height_px)))
        if clipped is None or clipped.area <= 0:
            raise RoiError(f"invalid ROI: it does not cover any of the slide ({width_px} x {height_px} px)")
        if isinstance(clipped, Polygon):
            clipped = MultiPolygon([clipped])
        return cls(clipped, roi)

    def area_um2(self, level0_mpp: float) -> float:
        return float(self.geometry.area) * level0_mpp * level0_mpp

    def bounds_px(self) -> tuple[int, int, int, int]:
        """Integer level-0 box (x0, y0, x1, y1) holding the clipped ROI."""
        x0, y0, x1, y1 = self.geometry.bounds
        return math.floor(x0), math.floor(y0), math.ceil(x1), math.ceil(y1)

    def raster(
        self, shape: tuple[int, int], px_per_level0: float, origin: tuple[int, int] = (0, 0)
    ) -> np.ndarray:
        """bool ``shape`` (h, w): the pixels of a grid with ``px_per_level0`` pixels per level-0
        pixel whose centres lie inside the ROI; ``origin`` (y, x) is the window's first grid pixel.

        Each polygon is filled (exterior, then its holes cleared) with OpenCV in 1/256 px fixed
        point, so the edge is placed to well under a pixel.
        """
        import cv2
        import numpy as np

        shift = 8
        one = 1 << shift
        out = np.zeros(shape, np.uint8)
        scratch = np.zeros(shape, np.uint8)

        def points(ring: Sequence[tuple[float, float]]) -> np.ndarray:
            xy = np.asarray(ring, dtype=np.float64)
            # grid pixel (i, j) has its centre at level-0 ((j + 0.5) / s, (i + 0.5) / s); OpenCV
            # puts pixel centres on integers, so x -> x * s - 0.5 - origin
            grid = xy * px_per_level0 - 0.5 - np.array([origin[1], origin[0]], dtype=np.float64)
            return np.round(grid * one).astype(np.int32).reshape(-1, 1, 2)

        for polygon in self.geometry.geoms:
            scratch[:] = 0
            cv2.fillPoly(scratch, [points(polygon.exterior.coords)], 1, lineType=cv2.LINE_8, shift=shift)
            holes = [points(r.coords) for r in polygon.interiors]
            if holes:
                cv2.fillPoly(scratch, holes, 0, lineType=cv2.LINE_8, shift=shift)
            out |= scratch
        return out.astype(bool)

    def restrict_tissue(self, tissue: TissueMask, level0_mpp: float) -> TissueMask:
        """The tissue mask cut to the ROI, grown by one mask pixel so every tile touching the ROI
        is planned (the label map is cut exactly afterwards, :meth:`clip_label_map`)."""
        import cv2
        import numpy as np

        from fprotoseg.worker.wsi.tissue import TissueMask

        s = level0_mpp / tissue.mpp  # mask px per level-0 px
        h, w = tissue.shape
        x0, y0, x1, y1 = self.bounds_px()
        wx0, wy0 = max(0, math.floor(x0 * s) - 1), max(0, math.floor(y0 * s) - 1)
        wx1, wy1 = min(w, math.ceil(x1 * s) + 2), min(h, math.ceil(y1 * s) + 2)
        packed = np.zeros_like(tissue.packed)  # only the ROI's rows are unpacked, never the mask
        if wx1 > wx0 and wy1 > wy0:
            inside = self.raster((wy1 - wy0, wx1 - wx0), s, (wy0, wx0)).view(np.uint8)
            inside = cv2.dilate(inside, np.ones((3, 3), np.uint8)).astype(bool)
            rows = np.zeros((wy1 - wy0, w), dtype=bool)
            rows[:, wx0:wx1] = tissue.window(wy0, wy1, wx0, wx1) & inside
            packed[wy0:wy1] = np.packbits(rows, axis=1)
        return TissueMask(packed, tissue.shape, tissue.mpp, tissue.saturation_threshold)

    def clip_label_map(self, label_map: np.ndarray, level0_mpp: float, output_mpp: float) -> None:
        """In place: every output pixel whose centre is outside the ROI becomes background (0).

        Only the ROI's bounding box is rasterised; outside it the map is zeroed band by band."""
        s = level0_mpp / output_mpp
        h, w = label_map.shape
        x0, y0, x1, y1 = self.bounds_px()
        bx0, by0 = max(0, math.floor(x0 * s)), max(0, math.floor(y0 * s))
        bx1, by1 = min(w, math.ceil(x1 * s) + 1), min(h, math.ceil(y1 * s) + 1)
        if bx1 <= bx0 or by1 <= by0:
            label_map[...] = 0
            return
        label_map[:by0] = 0
        label_map[by1:] = 0
        label_map[by0:by1, :bx0] = 0
        label_map[by0:by1, bx1:] = 0
        window = label_map[by0:by1, bx0:bx1]
        window[~self.raster(window.shape, s, (by0, bx0))] = 0

    def clip_regions(
        self, regions: Sequence[Region], level0_mpp: float, min_region_area_um2: float
    ) -> list[Region]:
        """The polygons intersected with the ROI (exactly, not to the output pixel); regions left
        below ``min_region_area_um2`` are dropped, as :func:`~fprotoseg.worker.wsi.vectorize.vectorize`
        drops them."""
        import shapely

        from fprotoseg.worker.wsi.vectorize import Region

        prepared = self.geometry
        shapely.prepare(prepared)
        px_area_um2 = level0_mpp * level0_mpp
        clipped: list[Region] = []
        for region in regions:
            geom = region.geometry
            if not shapely.contains(prepared, geom):
                geom = _polygonal(shapely.intersection(geom, prepared))
                if geom is None:
                    continue
                geom = shapely.orient_polygons(geom)
            area_um2 = float(shapely.area(geom)) * px_area_um2
            if area_um2 >= min_region_area_um2:
                clipped.append(Region(region.class_index, geom, area_um2))
        return clipped

    def provenance(self, level0_mpp: float) -> dict[str, Any]:
        """What provenance.json and stats.json record: the ROI as sent and its area on the slide."""
        x0, y0, x1, y1 = self.geometry.bounds
        return {
            "geometry": self.source.to_geojson(),
            "coordinates": "level-0 pixels",
            "bounds_px": [x0, y0, x1, y1],
            "area_um2": self.area_um2(level0_mpp),
        }


def _polygonal(geom: Any) -> Any:
    """The polygonal part of ``geom`` (a Polygon or MultiPolygon) made valid, or None when empty."""
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    if geom is None or geom.is_empty:
        return None
    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    polys: list[Polygon] = []
    for part in shapely.get_parts(geom):
        if isinstance(part, Polygon) and not part.is_empty:
            polys.append(part)
        elif isinstance(part, MultiPolygon):
            polys.extend(part.geoms)
    if not polys:
        return None
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)
