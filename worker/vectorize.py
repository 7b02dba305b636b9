"""Label map -> per-class polygons with holes, valid, simplified in µm, in level-0 pixels.

Why these steps:
- ``cv2.findContours(RETR_CCOMP)`` gives each 8-connected region's outer ring with its holes.
  Its points are pixel *centres*; growing the polygon by half a pixel (mitre joins, square caps)
  moves them onto pixel *edges*, so polygon areas match pixel counts (a centre-line outline
  would lose half a pixel along the whole perimeter: several % for small regions). Spurs one
  pixel wide (which make_valid turns into lines) come back as thin rectangles the same way.
- ``shapely.make_valid`` after every step that can break validity; QuPath rejects invalid rings.
- One Feature per connected region; a MultiPolygon only where simplification or the half-pixel
  growth leaves one region in several parts (e.g. two blobs touching at a corner).
- Memory: the map is traced in horizontal bands with one small reused buffer (viewed as uint8 for
  OpenCV, no copy); regions cut by a band seam are unioned back together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Region:
    """One connected region of one class, geometry in level-0 pixels."""

    class_index: int  # index into the segmenter's classes (label value - 1)
    geometry: object  # shapely Polygon | MultiPolygon
    area_um2: float


def _valid(geom: object) -> object:
    """make_valid only where needed: the validity test is several times cheaper than a rebuild."""
    import shapely

    return geom if shapely.is_valid(geom) else shapely.make_valid(geom)


def _polygonal(geom: object) -> object | None:
    """Keep only polygonal parts (make_valid may return lines/points beside them)."""
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    if geom is None or geom.is_empty:
        return None
    if isinstance(geom, Polygon):
        return geom
    if isinstance(geom, MultiPolygon):
        return geom if len(geom.geoms) > 1 else geom.geoms[0]
    parts = [g for g in shapely.get_parts(geom) if isinstance(g, (Polygon, MultiPolygon)) and not g.is_empty]
    polys: list[Polygon] = []
    for part in parts:
        polys.extend(part.geoms if isinstance(part, MultiPolygon) else [part])
    if not polys:
        return None
    return polys[0] if len(polys) == 1 else MultiPolygon(polys)


# Contours are traced on the band upsampled this many times (nearest): a diagonal step then costs
# a quarter of the area error of tracing at 1x (see the module docstring).
SUPERSAMPLE = 2


def _region_from_contours(shell: np.ndarray, holes: list[np.ndarray]) -> object | None:
    """Pixel-centre contours (cv2 points, supersampled units) -> pixel-edge polygon in output px.

    The polygon through pixel centres is grown by half a (supersampled) pixel. GEOS's buffer also
    repairs the self-touching rings that 8-connected tracing produces, so make_valid is needed
    only where the result is still invalid (rare; it is the slowest step when always run).
    """
    from shapely.geometry import LineString, Point, Polygon

    s = 1.0 / SUPERSAMPLE
    pts = (shell.reshape(-1, 2).astype(np.float64) + 0.5) * s
    if len(pts) >= 3:
        rings = [(h.reshape(-1, 2).astype(np.float64) + 0.5) * s for h in holes if len(h) >= 3]
        raw = Polygon(pts, rings)
    elif len(pts) == 2:
        raw = LineString(pts)
    else:
        raw = Point(pts[0])
    return _valid(raw.buffer(0.5 * s, cap_style="square", join_style="mitre"))


def _simplified_region(shell: np.ndarray, holes: list[np.ndarray], tol_px: float) -> object:
    """Fast path of trace -> pixel edges -> simplify: simplify the centre-line rings first (few
    vertices left), then ONE offset that lands on the pixel-edge area.

    The pixel-edge area is the centre-line area grown by half a supersampled pixel (Steiner:
    A + P*d + 4*d^2 per outer ring); the offset that restores it on the simplified outline is
    (target - area) / perimeter. Area and perimeter of the raw rings come from OpenCV and the
    Douglas-Peucker step is OpenCV's too: building and simplifying the vertex-dense outline in
    GEOS was most of the cost. A ring that simplification makes invalid is repaired by the
    offset (a GEOS buffer) or, failing that, by make_valid.
    """
    import cv2
    from shapely.geometry import Polygon

    s = 1.0 / SUPERSAMPLE
    half = 0.5 * s
    hole_rings = [h for h in holes if len(h) >= 3]
    area = cv2.contourArea(shell) - sum(cv2.contourArea(h) for h in hole_rings)
    length = cv2.arcLength(shell, True) + sum(cv2.arcLength(h, True) for h in hole_rings)
    target = (area + length * half * SUPERSAMPLE) * s * s + 4 * half * half
    eps = tol_px * SUPERSAMPLE

    def ring(contour: np.ndarray) -> np.ndarray:
        approx = cv2.approxPolyDP(contour, eps, True)
        chosen = approx if len(approx) >= 3 else contour
        return (chosen.reshape(-1, 2).astype(np.float64) + 0.5) * s

    simple = Polygon(ring(shell), [ring(h) for h in hole_rings])
    if simple.is_empty or simple.length == 0:
        return _region_from_contours(shell, holes)
    offset = (target - simple.area) / simple.length
    offset = min(max(offset, half * 0.25), half + tol_px)
    grown = _polygonal(_valid(simple.buffer(offset, join_style="mitre", mitre_limit=2.0)))
    return grown if grown is not None else _region_from_contours(shell, holes)


def _simplify_keeping_area(geom: object, tol_px: float) -> object:
    """Douglas-Peucker, then a sub-tolerance offset that restores the traced area.

    Why: on pixel staircases DP keeps the outer corners, so simplified regions grow by about
    tolerance/4 x perimeter: several % for small regions. Offsetting the simplified outline by
    (area lost) / perimeter (a fraction of the tolerance) puts the area back.
    """
    target = geom.area
    simple = _polygonal(_valid(geom.simplify(tol_px, preserve_topology=True)))
    if simple is None or simple.length == 0:
        return geom
    offset = (target - simple.area) / simple.length
    if abs(offset) < 1e-6 or abs(offset) > tol_px:
        return simple
    corrected = _polygonal(_valid(simple.buffer(offset, join_style="mitre", mitre_limit=2.0)))
    return corrected if corrected is not None else simple


def _band_rows(width_px: int, budget_bytes: int = 4 << 20) -> int:
    return max(64, budget_bytes // max(1, width_px))


def _label_bands(label_map: np.ndarray, label: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """(r0, r1, mask of ``label`` in rows r0..r1) band by band, in ONE reused buffer of a few MB.

    Empty bands are skipped. The mask is overwritten by the next band: use it before advancing.
    """
    height, width = label_map.shape
    rows = _band_rows(width)
    mask = np.empty((min(rows, height), width), dtype=bool)
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        band = mask[: r1 - r0]
        np.equal(label_map[r0:r1], label, out=band)
        if band.any():
            yield r0, r1, band


def absorb_small_regions(label_map: np.ndarray, n_classes: int, min_area_px: float) -> int:
    """In place: give every region smaller than ``min_area_px`` the majority label around it.

    Why: polygons below the minimum area are not worth a QuPath annotation, and dropping them
    only from the GeoJSON would make the polygons disagree with stats.json and mask.tiff. After
    this pass the label map, the statistics and the polygons describe the same regions.
    Band by band (small buffers); a speck cut by a band seam is left alone. Returns the count.
    """
    import cv2

    if min_area_px <= 1:
        return 0
    height, width = label_map.shape
    absorbed = 0
    for label in range(1, n_classes + 1):
        for r0, r1, band in _label_bands(label_map, label):
            contours, _ = cv2.findContours(band.view(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            for contour in contours:
                if cv2.contourArea(contour) + cv2.arcLength(contour, True) / 2 + 1 >= min_area_px:
                    continue
                x, y, w, h = cv2.boundingRect(contour)
                if (y == 0 and r0 > 0) or (y + h == r1 - r0 and r1 < height):
                    continue
                y0, y1 = max(0, y - 1), min(r1 - r0, y + h + 1)
                x0, x1 = max(0, x - 1), min(width, x + w + 1)
                window = label_map[r0 + y0 : r0 + y1, x0:x1]
                speck = np.zeros(window.shape, dtype=np.uint8)
                cv2.drawContours(speck, [contour], -1, 1, thickness=cv2.FILLED, offset=(-x0, -y0))
                speck = speck.astype(bool) & (window == label)
                ring = cv2.dilate(speck.view(np.uint8), np.ones((3, 3), np.uint8)).astype(bool) & ~speck
                neighbours = window[ring & (window != label)]
                if neighbours.size == 0:
                    continue
                window[speck] = np.bincount(neighbours, minlength=n_classes + 1).argmax()
                absorbed += 1
    return absorbed


def _class_pieces(
    label_map: np.ndarray, label: int, min_area_px: float, tol_px: float = 0.0
) -> Iterator[object]:
    """Pixel-edge polygons of one label, band by band, merged across band seams.

    Bands keep the working mask small (a few MB) whatever the map size; regions that reach a
    seam are unioned with their neighbours, so the result is the same as one whole-map pass.
    A generator, and every piece is simplified as soon as it is traced: only simplified seam
    pieces are ever held together, and the union of a region spanning the whole slide works on
    a fraction of the raw vertices (unioned on a grid of half the tolerance, which closes the
    sub-tolerance gaps that independent simplification can leave along a seam).
    """
    import cv2
    import shapely

    height = label_map.shape[0]
    open_pieces: list[object] = []  # pieces cut by a band seam, unioned at the end
    for r0, r1, band in _label_bands(label_map, label):
        fine = cv2.resize(
            band.view(np.uint8), None, fx=SUPERSAMPLE, fy=SUPERSAMPLE, interpolation=cv2.INTER_NEAREST
        )
        contours, hierarchy = cv2.findContours(fine, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        del fine
        if hierarchy is None:
            continue
        hier = hierarchy[0]
        fine_rows = SUPERSAMPLE * (r1 - r0)
        for i, contour in enumerate(contours):
            if hier[i][3] != -1:
                continue  # a hole; handled with its parent
            _, y, _, h = cv2.boundingRect(contour)
            at_seam = (y == 0 and r0 > 0) or (y + h == fine_rows and r1 < height)
            # Pixel-edge area estimate (shoelace of centres + half the perimeter + 1): drop specks
            # without building geometry (never a piece that may continue in the next band).
            fine_px = cv2.contourArea(contour) + cv2.arcLength(contour, True) / 2 + 1
            if not at_seam and fine_px / SUPERSAMPLE**2 < min_area_px:
                continue
            holes = []
            child = hier[i][2]
            while child != -1:
                holes.append(contours[child])
                child = hier[child][0]
            if tol_px > 0 and len(contour) >= 3:
                geom = _simplified_region(contour, holes, tol_px)
            else:
                geom = _region_from_contours(contour, holes)
                if tol_px > 0:
                    geom = _simplify_keeping_area(geom, tol_px)
            if r0:
                geom = shapely.transform(geom, lambda xy, dy=float(r0): xy + np.array([0.0, dy]))
            if at_seam:
                open_pieces.append(geom)
            else:
                yield geom
    # Pieces within the tolerance of each other are one region (simplification may open a gap
    # narrower than the tolerance along a seam): their union is yielded as ONE geometry, a
    # MultiPolygon where such a gap remains, never split into separate regions.
    for group in _touching_groups(open_pieces, distance=tol_px):
        if len(group) == 1:
            yield open_pieces[group[0]]
        else:
            yield shapely.union_all([open_pieces[i] for i in group], grid_size=max(1e-6, tol_px / 4))


def _touching_groups(geoms: list[object], distance: float = 0.0) -> list[list[int]]:
    """Indices of pieces that touch, transitively (so each union is small, not one per class)."""
    import shapely

    if not geoms:
        return []
    parent = list(range(len(geoms)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    tree = shapely.STRtree(geoms)
    if distance > 0:
        pairs = tree.query(geoms, predicate="dwithin", distance=distance)
    else:
        pairs = tree.query(geoms, predicate="intersects")
    for a, b in zip(pairs[0].tolist(), pairs[1].tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
    groups: dict[int, list[int]] = {}
    for i in range(len(geoms)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def vectorize(
    label_map: np.ndarray,
    n_classes: int,
    *,
    output_mpp: float,
    level0_px_per_output_px: float,
    slide_width_px: int,
    slide_height_px: int,
    simplify_tolerance_um: float = 1.0,
    min_region_area_um2: float = 50.0,
    progress: Callable[[int, int], None] | None = None,
) -> list[Region]:
    """Regions of every class (label ``k + 1`` -> class ``k``), largest first within a class."""
    import shapely
    from shapely.geometry.polygon import orient

    px_area_um2 = output_mpp * output_mpp
    min_area_px = min_region_area_um2 / px_area_um2
    tol_px = simplify_tolerance_um / output_mpp
    scale = float(level0_px_per_output_px)
    bounds = shapely.box(0, 0, slide_width_px, slide_height_px)
    regions: list[Region] = []
    for k in range(n_classes):
        if progress is not None:
            progress(k, n_classes)
        class_regions: list[Region] = []
        for piece in _class_pieces(label_map, k + 1, min_area_px, tol_px):
            geom = _polygonal(_valid(piece))
            if geom is None:
                continue
            area_um2 = float(geom.area) * px_area_um2
            if area_um2 < min_region_area_um2:
                continue
            geom = shapely.transform(geom, lambda xy: xy * scale)
            if not bounds.contains(geom):
                geom = geom.intersection(bounds)
            # 0.001 px rounding by coordinate transform: set_precision (a full overlay) on a
            # slide-spanning region costs memory in proportion to its vertices.
            geom = _polygonal(_valid(shapely.transform(geom, lambda xy: np.round(xy, 3))))
            if geom is None:
                continue
            if geom.geom_type == "Polygon":
                geom = orient(geom, sign=1.0)
            else:
                geom = shapely.MultiPolygon([orient(p, sign=1.0) for p in geom.geoms])
            class_regions.append(Region(class_index=k, geometry=geom, area_um2=area_um2))
        class_regions.sort(key=lambda r: -r.area_um2)
        regions.extend(class_regions)
    if progress is not None:
        progress(n_classes, n_classes)
    return regions


def region_counts(regions: Sequence[Region], n_classes: int) -> list[int]:
    counts = [0] * n_classes
    for region in regions:
        counts[region.class_index] += 1
    return counts
