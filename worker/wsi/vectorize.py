"""Label map -> per-class polygons with holes, valid, simplified in µm, in level-0 pixels.

Why these steps:
- ``cv2.findContours(RETR_CCOMP)`` gives each 8-connected region's outer ring with its holes,
  through the *centres* of its boundary pixels. Pick's theorem on that lattice ring gives the
  region's exact pixel count (area + boundary points / 2 + 1, minus the same for holes), so no
  raster pass is needed for areas.
- Each ring is simplified (OpenCV's Douglas-Peucker, tolerance in µm) and then offset outwards
  with mitre joins, in numpy, by the distance that makes the polygon's area equal that pixel
  count (about half a pixel: from pixel centres onto pixel edges; without simplification exactly
  half, so axis-aligned edges land on pixel edges). A centre-line outline would lose half a pixel
  along the whole perimeter (several % for small regions), and plain Douglas-Peucker on a pixel
  staircase keeps its outer corners (the polygon grows by about tolerance/4 x perimeter).
- Geometry is built, checked and transformed in bulk (shapely's array functions): only the rare
  invalid polygon (a narrow neck that the offset closes, two parts touching at a corner) goes
  through ``make_valid``; rings that cannot be offset (one-pixel specks and lines) through a GEOS
  buffer with square caps. QuPath rejects invalid rings.
- One Feature per connected region; a MultiPolygon only where simplification or the offset leaves
  one region in several parts (e.g. two blobs touching at a corner).
- Memory: the map is traced in horizontal bands of a fixed byte budget (one reused mask; OpenCV
  copies it once more), whatever the slide size; regions cut by a band seam are unioned back
  together. The default band (16 MB) holds a 16k x 16k px slide's whole map at 2 µm/px.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Bytes of label map per band: the working set of tracing is about twice this (mask + OpenCV's copy).
BAND_BYTES = 16 << 20
MITRE_LIMIT = 2.0


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


def _polygonal(geom: Any) -> Any:
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


# ------------------------------------------------------------------------------ rings and offsets
# Every ring of a band is processed at once: points of all rings in one array, with per-ring
# sums by np.add.reduceat. Per-ring numpy calls cost more than the arithmetic on thousands of
# small regions.


@dataclass(frozen=True)
class _Rings:
    """Closed rings (last point not repeated) in one array; ``region`` maps ring -> region."""

    xy: np.ndarray  # (N, 2)
    lengths: np.ndarray  # (R,) points per ring, each >= 3
    region: np.ndarray  # (R,) non-decreasing; a region's shell is its first ring

    @property
    def starts(self) -> np.ndarray:
        return np.cumsum(self.lengths) - self.lengths

    @property
    def ring_of_point(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.lengths)), self.lengths)

    def successor(self) -> np.ndarray:
        nxt = np.arange(1, len(self.xy) + 1)
        nxt[self.starts + self.lengths - 1] = self.starts
        return nxt

    def sums(self, per_point: np.ndarray) -> np.ndarray:
        return np.add.reduceat(per_point, self.starts) if len(self.lengths) else per_point[:0]

    def signed_areas(self) -> np.ndarray:
        nxt = self.successor()
        x, y = self.xy[:, 0], self.xy[:, 1]
        return 0.5 * self.sums(x * y[nxt] - x[nxt] * y)

    def reversed_where(self, flip: np.ndarray) -> _Rings:
        j = np.arange(len(self.xy))
        ring = self.ring_of_point
        start = self.starts[ring]
        order = np.where(flip[ring], 2 * start + self.lengths[ring] - 1 - j, j)
        return _Rings(self.xy[order], self.lengths, self.region)

    def keep(self, rings: np.ndarray) -> _Rings:
        return _Rings(self.xy[rings[self.ring_of_point]], self.lengths[rings], self.region[rings])


def _lattice_pixels(contours: Sequence[np.ndarray], region: np.ndarray) -> np.ndarray:
    """Pixel count per region from its cv2 contours (pixel centres, CHAIN_APPROX_SIMPLE: every
    segment axis-aligned or diagonal) by Pick's theorem: the shell's area + boundary points/2 + 1,
    minus each hole's interior points (area - boundary points/2 + 1). No raster pass needed."""
    lengths = np.fromiter((len(c) for c in contours), dtype=np.int64, count=len(contours))
    rings = _Rings(np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.int64), lengths, region)
    steps = rings.sums(np.abs(rings.xy[rings.successor()] - rings.xy).max(axis=1)).astype(np.float64)
    areas = np.abs(rings.signed_areas())
    is_shell = np.r_[True, region[1:] != region[:-1]]
    per_ring = np.where(is_shell, areas + steps / 2 + 1, -(areas - steps / 2 + 1))
    return np.add.reduceat(per_ring, np.flatnonzero(is_shell))


def _directions(rings: _Rings) -> tuple[np.ndarray, np.ndarray]:
    """Unit direction of each point's outgoing edge, and each point's predecessor index."""
    nxt = rings.successor()
    e = rings.xy[nxt] - rings.xy
    prev = np.empty(len(e), dtype=np.int64)
    prev[nxt] = np.arange(len(e))
    return e / np.maximum(np.hypot(e[:, 0], e[:, 1]), 1e-12)[:, None], prev


def _offset(rings: _Rings, d: np.ndarray) -> tuple[_Rings, np.ndarray]:
    """Mitre offset of every ring by its region's ``d`` to the right of its direction: outwards
    for shells with positive area and holes with negative area. Also returns, per output point,
    the index of the input point it came from.

    Convex vertices sharper than the mitre limit get two points (a square cap: a one-pixel spur
    becomes a one-pixel-wide rectangle); concave ones keep the mitre point, its length clamped
    (what little overlap that leaves is repaired by make_valid later).
    """
    xy = rings.xy
    t, prev = _directions(rings)
    n = np.stack([t[:, 1], -t[:, 0]], axis=1)
    t_prev, n_prev = t[prev], n[prev]
    dp = d[rings.region][rings.ring_of_point][:, None]
    dot = (n_prev * n).sum(axis=1)
    cross = t_prev[:, 0] * t[:, 1] - t_prev[:, 1] * t[:, 0]
    sharp = (1.0 + dot) < 2.0 / MITRE_LIMIT**2
    bisector = n_prev + n
    out = xy + dp * bisector / np.maximum(1.0 + dot, 1e-12)[:, None]
    norm = np.maximum(np.hypot(bisector[:, 0], bisector[:, 1]), 1e-12)[:, None]
    capped = sharp & (cross >= -1e-12)
    concave = sharp & ~capped
    out[concave] = xy[concave] + (dp[concave] * MITRE_LIMIT) * bisector[concave] / norm[concave]
    if not capped.any():
        return _Rings(out, rings.lengths, rings.region), np.arange(len(xy))
    counts = np.where(capped, 2, 1)
    first = np.cumsum(counts) - counts
    grown = np.empty((int(counts.sum()), 2))
    grown[first] = np.where(capped[:, None], xy + dp * (n_prev + t_prev), out)
    grown[first[capped] + 1] = xy[capped] + dp[capped] * (n[capped] - t[capped])
    source = np.repeat(np.arange(len(xy)), counts)
    return _Rings(grown, rings.lengths + rings.sums(capped.astype(np.int64)), rings.region), source


def _corner_sums(rings: _Rings) -> np.ndarray:
    """Per ring, the sum of tan(turn/2): a mitre offset by d adds perimeter*d + this*d²."""
    t, prev = _directions(rings)
    tp = t[prev]
    cross = tp[:, 0] * t[:, 1] - tp[:, 1] * t[:, 0]
    return rings.sums(cross / np.maximum(1.0 + (tp * t).sum(axis=1), 0.25))


def _simplify_pinned(contour: np.ndarray, eps: float, pinned: np.ndarray) -> np.ndarray:
    """Douglas-Peucker on a closed contour that keeps every ``pinned`` point: each stretch
    between two pinned points is simplified on its own, its ends fixed."""
    import cv2

    pts = contour.reshape(-1, 2)
    if pinned.all():
        return pts
    if not pinned.any():
        return cv2.approxPolyDP(contour, eps, True).reshape(-1, 2)
    start = int(np.argmax(pinned))
    pts, pinned = np.roll(pts, -start, axis=0), np.roll(pinned, -start)
    ends = np.r_[np.flatnonzero(pinned), len(pts)]
    out: list[np.ndarray] = []
    done = 0
    for g in np.flatnonzero(np.diff(ends) > 1):  # a free stretch between pinned ends[g], ends[g+1]
        a, b = int(ends[g]), int(ends[g + 1])
        out.append(pts[done : a + 1])  # the pinned run up to a
        chain = np.vstack([pts[a:b], pts[b % len(pts)]]).astype(np.int32)
        out.append(cv2.approxPolyDP(chain.reshape(-1, 1, 2), eps, False).reshape(-1, 2)[1:-1])
        done = b
    out.append(pts[done:])
    return np.concatenate(out)


def _edge_rings(
    regions: Sequence[Sequence[np.ndarray]],
    pixels: np.ndarray,
    tol_px: float,
    dy: float,
    at_seam: np.ndarray,
    seam_rows: tuple[int | None, int | None],
    scale: float,
) -> _Rings:
    """Traced regions (cv2 contours, shell first, each ring >= 3 points) -> pixel-edge rings,
    shifted down by ``dy`` rows, in level-0 px (output px x ``scale``) rounded to 0.001 px.

    Each ring is simplified (Douglas-Peucker, unless ``tol_px == 0``), oriented (shell
    positive) and offset outwards by the d that solves area(d) = the region's pixel count, with
    area(d) = area + perimeter*d + corners*d² for mitre joins. On a pixel staircase d is half a
    pixel (axis-aligned edges land on pixel edges); diagonal steps and simplification move it a
    little (a centre line offset by exactly half a pixel would overstate a ragged region by ~1%).

    Regions ``at_seam`` continue in the next band: within a pixel of a seam row (band-local
    ``seam_rows``: top, bottom; None where the band has no seam there) their outline is not
    simplified, and the side that faces the seam is put exactly on the band edge. The pieces of
    a region on both sides of a seam then meet exactly, with neither gap nor overlap.
    """
    import cv2

    top, bottom = seam_rows
    simple: list[np.ndarray] = []
    region_of_ring: list[int] = []
    for r, contours in enumerate(regions):
        for contour in contours:
            pts = contour.reshape(-1, 2)
            if tol_px > 0 and len(pts) > 3:
                if at_seam[r]:
                    y = pts[:, 1]
                    pinned = np.zeros(len(pts), dtype=bool)
                    if top is not None:
                        pinned |= y <= top + 1
                    if bottom is not None:
                        pinned |= y >= bottom - 1
                    approx = _simplify_pinned(contour, tol_px, pinned)
                else:
                    approx = cv2.approxPolyDP(contour, tol_px, True).reshape(-1, 2)
                if len(approx) >= 3:
                    pts = approx
            simple.append(pts)
            region_of_ring.append(r)
    lengths = np.fromiter((len(s) for s in simple), dtype=np.int64, count=len(simple))
    rings = _Rings(np.concatenate(simple).astype(np.float64) + 0.5, lengths, np.asarray(region_of_ring))
    is_shell = np.r_[True, rings.region[1:] != rings.region[:-1]]
    areas = rings.signed_areas()
    flip = (areas < 0) == is_shell
    rings = rings.reversed_where(flip)
    areas = np.where(flip, -areas, areas)
    seg = rings.xy[rings.successor()] - rings.xy
    perimeter = np.bincount(rings.region, rings.sums(np.hypot(seg[:, 0], seg[:, 1])), len(regions))
    corners = np.bincount(rings.region, _corner_sums(rings), len(regions))
    short = pixels - np.bincount(rings.region, areas, len(regions))
    if at_seam.any():
        # edges along a seam row that face the seam end up on the band edge whatever d is (see
        # below): they take exactly half a pixel, and d is solved for the rest of the outline
        y0, y1 = rings.xy[:, 1], rings.xy[rings.successor(), 1]
        facing = np.zeros(len(seg), dtype=bool)
        if top is not None:
            facing |= (y0 == top + 0.5) & (y1 == top + 0.5) & (seg[:, 0] > 0)
        if bottom is not None:
            facing |= (y0 == bottom + 0.5) & (y1 == bottom + 0.5) & (seg[:, 0] < 0)
        point_region = rings.region[rings.ring_of_point]
        facing &= at_seam[point_region]
        seam_len = np.bincount(point_region[facing], np.abs(seg[facing, 0]), len(regions))
        short = short - 0.5 * seam_len
        perimeter = perimeter - seam_len
    disc = perimeter * perimeter + 4.0 * corners * short
    root = np.sqrt(np.maximum(disc, 0.0))
    d = np.where(disc > 0, 2.0 * short / (perimeter + root), short / np.maximum(perimeter, 1e-9))
    d = np.clip(d, 0.05, 0.5 + tol_px)
    grown, source = _offset(rings, d)
    if at_seam.any():
        src_y = rings.xy[source, 1]
        y = grown.xy[:, 1]
        on_seam_piece = at_seam[grown.region[grown.ring_of_point]]
        if top is not None:
            y[on_seam_piece & (src_y == top + 0.5) & (y < src_y)] = float(top)
        if bottom is not None:
            y[on_seam_piece & (src_y == bottom + 0.5) & (y > src_y)] = float(bottom + 1)
    # a hole smaller than the offset vanishes (its offset ring turns inside out): drop it
    grown = grown.keep(is_shell | (grown.signed_areas() < -1e-9))
    xy = grown.xy
    xy[:, 1] += dy
    np.round(xy * scale, 3, out=xy)
    return grown


def _polygons(rings: _Rings) -> np.ndarray:
    """One Polygon per region (shell = its first ring) in two vectorised shapely calls."""
    import shapely

    if not len(rings.lengths):
        return np.empty(0, dtype=object)
    _, region = np.unique(rings.region, return_inverse=True)
    return shapely.polygons(shapely.linearrings(rings.xy, indices=rings.ring_of_point), indices=region)


def _insert_seam_vertices(rings: _Rings, seam_ys: np.ndarray) -> _Rings:
    """Give every edge that lies on a seam line every vertex that any ring has inside it on that
    line. The two sides of a seam then share identical edges, which is what a coverage union
    (linear, unlike an overlay) needs to dissolve them."""
    xy = rings.xy
    nxt = rings.successor()
    on = np.isin(xy[:, 1], seam_ys)
    if not on.any():
        return rings
    along = np.flatnonzero(on & on[nxt] & (xy[:, 1] == xy[nxt, 1]))
    line = np.searchsorted(seam_ys, xy[on, 1])
    span = float(np.abs(xy[:, 0]).max()) * 2 + 10.0
    keys = line * span + xy[on, 0]
    order = np.argsort(keys, kind="stable")
    keys, xs = keys[order], xy[on, 0][order]
    inserts: dict[int, np.ndarray] = {}
    for i in along.tolist():
        x0, x1 = xy[i, 0], xy[nxt[i], 0]
        base = np.searchsorted(seam_ys, xy[i, 1]) * span
        a = np.searchsorted(keys, base + min(x0, x1), side="right")
        b = np.searchsorted(keys, base + max(x0, x1), side="left")
        if b > a:
            inside = np.unique(xs[a:b])
            inserts[i] = inside if x1 > x0 else inside[::-1]
    if not inserts:
        return rings
    counts = np.ones(len(xy), dtype=np.int64)
    for i, values in inserts.items():
        counts[i] += len(values)
    first = np.cumsum(counts) - counts
    out = np.empty((int(counts.sum()), 2))
    out[first] = xy
    for i, values in inserts.items():
        out[first[i] + 1 : first[i] + 1 + len(values), 0] = values
        out[first[i] + 1 : first[i] + 1 + len(values), 1] = xy[i, 1]
    return _Rings(out, rings.lengths + rings.sums(counts - 1), rings.region)


def _buffered_region(
    shell: np.ndarray, holes: Sequence[np.ndarray], dy: float = 0.0, scale: float = 1.0
) -> object | None:
    """GEOS path for what the numpy offset cannot take (a speck, a one-pixel line): the centre
    line grown by half a pixel with square caps; level-0 px like ``_edge_rings``."""
    import shapely
    from shapely.geometry import LineString, Point, Polygon

    shift = np.array([0.5, 0.5 + dy])
    pts = shell.reshape(-1, 2) + shift
    if len(pts) >= 3:
        raw = Polygon(pts, [h.reshape(-1, 2) + shift for h in holes if len(h) >= 3])
    elif len(pts) == 2:
        raw = LineString(pts)
    else:
        raw = Point(pts[0])
    grown = raw.buffer(0.5, cap_style="square", join_style="mitre")
    return _polygonal(_valid(shapely.transform(grown, lambda xy: np.round(xy * scale, 3))))


def _object_array(geoms: Sequence[object]) -> np.ndarray:
    out = np.empty(len(geoms), dtype=object)
    out[:] = geoms
    return out


def _repair(geoms: np.ndarray) -> np.ndarray:
    """In place: make_valid (keeping polygonal parts) on the invalid ones only; None where
    nothing polygonal is left (see ``_present``)."""
    import shapely

    for i in np.flatnonzero(~shapely.is_valid(geoms)):
        geoms[i] = _polygonal(shapely.make_valid(geoms[i]))
    return geoms


def _present(geoms: np.ndarray) -> np.ndarray:
    return np.fromiter((g is not None for g in geoms), dtype=bool, count=len(geoms))


def _present_only(geoms: np.ndarray) -> np.ndarray:
    return geoms[_present(geoms)]


# ------------------------------------------------------------------------------------------ bands
def _band_rows(width_px: int, budget_bytes: int = BAND_BYTES) -> int:
    return max(64, budget_bytes // max(1, width_px))


def _label_bands(
    label_map: np.ndarray, label: int, band_bytes: int = BAND_BYTES
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(r0, r1, mask of ``label`` in rows r0..r1) band by band, in ONE reused buffer.

    Empty bands are skipped. The mask is overwritten by the next band: use it before advancing.
    """
    height, width = label_map.shape
    rows = _band_rows(width, band_bytes)
    mask = np.empty((min(rows, height), width), dtype=bool)
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        band = mask[: r1 - r0]
        np.equal(label_map[r0:r1], label, out=band)
        if band.any():
            yield r0, r1, band


def absorb_small_regions(
    label_map: np.ndarray, n_classes: int, min_area_px: float, band_bytes: int = BAND_BYTES
) -> int:
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
        for r0, r1, band in _label_bands(label_map, label, band_bytes):
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


def _class_polygons(
    label_map: np.ndarray,
    label: int,
    min_area_px: float,
    tol_px: float,
    scale: float,
    band_bytes: int = BAND_BYTES,
) -> np.ndarray:
    """Valid pixel-edge polygons (level-0 px) of one label, band by band, merged across seams.

    Regions that reach a band seam are merged with their other pieces, so the result is the same
    as one whole-map pass. The pieces meet exactly on the seam lines (see ``_edge_rings``): with
    each other's seam vertices inserted, a coverage union dissolves the shared edges.
    """
    import cv2
    import shapely

    height = label_map.shape[0]
    done: list[np.ndarray] = []
    seam_rings: list[_Rings] = []  # pieces to merge, kept as rings until every band is traced
    seam_lines: list[float] = []
    regions_so_far = 0
    for r0, r1, band in _label_bands(label_map, label, band_bytes):
        if r0 > 0:
            seam_lines.append(round(r0 * scale, 3))
        contours, hierarchy = cv2.findContours(band.view(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        if hierarchy is None:
            continue
        hier = hierarchy[0]
        groups: list[list[np.ndarray]] = []
        at_seam: list[bool] = []
        for i in np.flatnonzero(hier[:, 3] == -1):  # outer contours; holes come with their parent
            _, y, _, h = cv2.boundingRect(contours[int(i)])
            at_seam.append(bool((y == 0 and r0 > 0) or (y + h == r1 - r0 and r1 < height)))
            group = [contours[int(i)]]
            child = hier[i][2]
            while child != -1:
                group.append(contours[child])
                child = hier[child][0]
            groups.append(group)
        sizes = [len(g) for g in groups]
        pixels = _lattice_pixels([c for g in groups for c in g], np.repeat(np.arange(len(groups)), sizes))
        seam = np.array(at_seam, dtype=bool)
        # drop specks before building geometry (never a piece that may continue past a seam)
        wanted = seam | (pixels >= min_area_px)
        # rings of < 3 points (a speck, a one-pixel line) cannot be offset: GEOS buffers them
        odd = np.array([min(len(c) for c in g) < 3 for g in groups], dtype=bool) & wanted
        fast = np.flatnonzero(wanted & ~odd)
        if len(fast):
            rings = _edge_rings(
                [groups[i] for i in fast],
                pixels[fast],
                tol_px,
                float(r0),
                seam[fast],
                (0 if r0 > 0 else None, r1 - r0 - 1 if r1 < height else None),
                scale,
            )
            ring_at_seam = seam[fast][rings.region]
            inner = rings.keep(~ring_at_seam)
            done.append(_present_only(_repair(_polygons(inner))))
            cut = rings.keep(ring_at_seam)
            seam_rings.append(_Rings(cut.xy, cut.lengths, cut.region + regions_so_far))
            regions_so_far += len(fast)
        for i in np.flatnonzero(odd):
            geom = _buffered_region(groups[i][0], groups[i][1:], float(r0), scale)
            if geom is None:
                continue
            if not seam[i]:
                done.append(_object_array([geom]))
                continue
            # its rings join the numpy-built pieces (one region per polygon part)
            for part in shapely.get_parts(geom):
                part_rings = [np.asarray(part.exterior.coords)[:-1]]
                part_rings += [np.asarray(h.coords)[:-1] for h in part.interiors]
                seam_rings.append(
                    _Rings(
                        np.concatenate(part_rings),
                        np.array([len(r) for r in part_rings], dtype=np.int64),
                        np.full(len(part_rings), regions_so_far, dtype=np.int64),
                    )
                )
                regions_so_far += 1
    if seam_rings:
        done.append(_merge_seam_pieces(seam_rings, np.array(sorted(seam_lines))))
    return np.concatenate(done) if done else np.empty(0, dtype=object)


def _merge_seam_pieces(seam_rings: list[_Rings], seam_ys: np.ndarray) -> np.ndarray:
    """Pieces that touch across a seam are one region: ONE geometry each (a MultiPolygon where
    parts only touch at a corner), never split into separate regions."""
    import shapely

    rings = _Rings(
        np.concatenate([r.xy for r in seam_rings]),
        np.concatenate([r.lengths for r in seam_rings]),
        np.concatenate([r.region for r in seam_rings]),
    )
    pieces = _polygons(_insert_seam_vertices(rings, seam_ys))
    merged = []
    for group in _seam_groups(list(pieces), seam_ys):
        if len(group) == 1:
            merged.append(pieces[group[0]])
            continue
        try:
            geom = shapely.coverage_union_all(pieces[group])
        except shapely.errors.GEOSException:  # an invalid piece: repair, then a full overlay
            geom = shapely.union_all(_present_only(_repair(pieces[group].copy())))
        merged.append(geom)
    # One validity check, after the union: a coverage union of valid, non-overlapping pieces is
    # valid, and checking the slide-spanning pieces before it too would double the cost.
    repaired = _repair(_object_array(merged))
    return _object_array([g for g in map(_polygonal, repaired) if g is not None])


def _seam_groups(pieces: list[object], seam_ys: np.ndarray) -> list[list[int]]:
    """Indices of seam pieces that form one region, transitively.

    Pieces meet only on seam lines, so only thin strips along them are compared (clip_by_rect
    is linear; a predicate on a whole slide-spanning piece is not): strips that touch, or come
    within a tenth of a pixel (an 8-connected diagonal contact), belong to one region.
    """
    import shapely

    if not pieces:
        return []
    strips: list[object] = []
    owner: list[int] = []
    bounds = shapely.bounds(_object_array(pieces))
    for i, piece in enumerate(pieces):
        lo, hi = np.searchsorted(seam_ys, [bounds[i, 1], bounds[i, 3]])
        for y in seam_ys[max(0, lo - 1) : hi + 1]:
            strip = shapely.clip_by_rect(piece, -1e12, y - 0.01, 1e12, y + 0.01)
            if not strip.is_empty:
                strips.append(strip)
                owner.append(i)
    parent = list(range(len(pieces)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if strips:
        a, b = shapely.STRtree(strips).query(strips, predicate="dwithin", distance=0.1)
        for i, j in zip(a.tolist(), b.tolist(), strict=True):
            ri, rj = find(owner[i]), find(owner[j])
            if ri != rj:
                parent[ri] = rj
    groups: dict[int, list[int]] = {}
    for i in range(len(pieces)):
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
    band_bytes: int = BAND_BYTES,
) -> list[Region]:
    """Regions of every class (label ``k + 1`` -> class ``k``), largest first within a class."""
    import shapely

    px_area_um2 = output_mpp * output_mpp
    min_area_px = min_region_area_um2 / px_area_um2
    tol_px = simplify_tolerance_um / output_mpp
    scale = float(level0_px_per_output_px)
    regions: list[Region] = []
    for k in range(n_classes):
        if progress is not None:
            progress(k, n_classes)
        # level-0 px, rounded to 0.001 px in numpy as the rings are made (set_precision, a full
        # overlay, would cost memory in proportion to a slide-spanning region's vertices)
        geoms = _class_polygons(label_map, k + 1, min_area_px, tol_px, scale, band_bytes)
        if not len(geoms):
            continue
        # clipped to the slide first: the last output pixels can reach past its edge, and the
        # area measured (and filtered on) must be that of the polygon written
        bounds = shapely.bounds(geoms)
        outside = np.flatnonzero(
            (bounds[:, 0] < 0)
            | (bounds[:, 1] < 0)
            | (bounds[:, 2] > slide_width_px)
            | (bounds[:, 3] > slide_height_px)
        )
        if len(outside):
            slide_box = shapely.box(0, 0, slide_width_px, slide_height_px)
            for i in outside:
                geoms[i] = _polygonal(_valid(geoms[i].intersection(slide_box)))
            geoms = geoms[_present(geoms)]
        areas_um2 = shapely.area(geoms) * (px_area_um2 / scale**2)
        keep = areas_um2 >= min_region_area_um2
        geoms, areas_um2 = geoms[keep], areas_um2[keep]
        geoms = shapely.orient_polygons(geoms)  # QuPath/GeoJSON: shells counter-clockwise
        order = np.argsort(-areas_um2, kind="stable")
        regions.extend(Region(k, geoms[i], float(areas_um2[i])) for i in order)
    if progress is not None:
        progress(n_classes, n_classes)
    return regions


def region_counts(regions: Sequence[Region], n_classes: int) -> list[int]:
    counts = [0] * n_classes
    for region in regions:
        counts[region.class_index] += 1
    return counts
