"""Vectorisation on label maps whose answer is known exactly: pixel-edge areas, holes, band seams."""

from __future__ import annotations

import numpy as np
import pytest

from fprotoseg.worker.wsi.vectorize import _band_rows, vectorize


def _vec(label_map: np.ndarray, n_classes: int = 2, **kw):
    h, w = label_map.shape
    return vectorize(label_map, n_classes, output_mpp=2.0, level0_px_per_output_px=4.0,
                     slide_width_px=w * 4, slide_height_px=h * 4, **kw)


def test_areas_holes_and_adjacent_classes_exact():
    lm = np.zeros((300, 400), np.uint8)
    lm[20:220, 30:230] = 1
    lm[80:120, 90:150] = 0  # a hole
    lm[20:220, 230:330] = 2  # shares an edge with class 1
    regions = _vec(lm, simplify_tolerance_um=0)
    by_class = {r.class_index: r for r in regions}
    assert len(regions) == 2
    # areas are the pixel counts: the offset from pixel centres is solved per region, so the
    # diagonal steps cv2 traces at the hole's corners do not count
    assert by_class[0].area_um2 == pytest.approx((200 * 200 - 40 * 60) * 4.0, rel=1e-5)
    assert by_class[1].area_um2 == pytest.approx(200 * 100 * 4.0)
    poly = by_class[0].geometry
    assert poly.geom_type == "Polygon" and len(poly.interiors) == 1
    # level-0 coordinates: output px x 4, origin top-left, x is the column
    assert poly.bounds == pytest.approx((30 * 4, 20 * 4, 230 * 4, 220 * 4), abs=0.05)
    assert poly.intersection(by_class[1].geometry).area < 1.0  # level-0 px²: at most a sliver


def test_regions_crossing_band_seams_are_merged_with_their_holes():
    width = 300
    band_bytes = 64 * width  # tiny bands: three seams on a small map
    rows = _band_rows(width, band_bytes)
    lm = np.zeros((rows * 3 + 17, width), np.uint8)
    lm[rows - 50 : 2 * rows + 60, 40:260] = 1  # crosses two seams
    lm[rows - 10 : rows + 10, 100:140] = 0  # a hole cut by the first seam
    lm[5:25, 5:25] = 1  # a separate small region (400 px = 1600 µm²)
    regions = _vec(lm, simplify_tolerance_um=0, band_bytes=band_bytes)
    assert [r.class_index for r in regions] == [0, 0]
    big = regions[0]
    assert big.geometry.geom_type == "Polygon" and len(big.geometry.interiors) == 1
    assert big.area_um2 == pytest.approx(((rows + 110) * 220 - 20 * 40) * 4.0, rel=1e-4)
    assert regions[1].area_um2 == pytest.approx(400 * 4.0)


def test_specks_below_min_area_dropped_and_simplification_keeps_area():
    rng = np.random.default_rng(0)
    lm = np.zeros((200, 200), np.uint8)
    yy, xx = np.ogrid[:200, :200]
    lm[(yy - 100) ** 2 + (xx - 100) ** 2 <= 70**2] = 1
    lm[rng.integers(0, 20, 30), rng.integers(0, 20, 30)] = 2  # single-pixel specks (4 µm² each)
    regions = _vec(lm, min_region_area_um2=50.0, simplify_tolerance_um=1.0)
    assert [r.class_index for r in regions] == [0]
    assert regions[0].area_um2 == pytest.approx((lm == 1).sum() * 4.0, rel=0.01)
    assert regions[0].geometry.is_valid


def test_specks_absorbed_so_polygons_agree_with_pixel_counts():
    """Regression: specks dropped only from the GeoJSON made a speck-only class 100% off."""
    from fprotoseg.worker.wsi.vectorize import absorb_small_regions

    rng = np.random.default_rng(1)
    lm = np.zeros((400, 500), np.uint8)
    lm[50:350, 50:450] = 1
    ys, xs = rng.integers(60, 340, 300), rng.integers(60, 440, 300)
    lm[ys, xs] = 2  # single-pixel specks inside class 1
    lm[100:160, 100:180] = 2  # one real class-2 region (4800 px)
    lm[200:202, 460:462] = 1  # a 4 px class-1 speck on glass
    absorbed = absorb_small_regions(lm, 2, min_area_px=50 / 4.0)
    assert absorbed > 250
    assert lm[200:202, 460:462].max() == 0
    regions = _vec(lm, min_region_area_um2=50.0, simplify_tolerance_um=0)
    for k in (0, 1):
        px = int((lm == k + 1).sum())
        poly_um2 = sum(r.area_um2 for r in regions if r.class_index == k)
        assert poly_um2 == pytest.approx(px * 4.0, rel=0.01), k
    assert sum(r.class_index == 1 for r in regions) >= 1


def test_fragmented_multiclass_map_areas_within_one_percent():
    """A map like a real network's (smooth random class fields, many small regions of a rare
    class): after absorption, every class's polygon area is within 1% of its pixel area."""
    import cv2

    from fprotoseg.worker.wsi.vectorize import absorb_small_regions

    rng = np.random.default_rng(7)
    fields = [cv2.GaussianBlur(rng.random((600, 700)).astype(np.float32), (0, 0), s) for s in (6, 6, 3)]
    fields[2] -= 0.02  # a rarer third class in small islands
    lm = (np.argmax(np.stack(fields), axis=0) + 1).astype(np.uint8)
    lm[:40] = 0  # some glass
    absorb_small_regions(lm, 3, min_area_px=50 / 4.0)
    regions = _vec(lm, n_classes=3, min_region_area_um2=50.0)
    assert all(r.geometry.is_valid for r in regions)
    for k in range(3):
        px = int((lm == k + 1).sum())
        assert px > 0
        poly_um2 = sum(r.area_um2 for r in regions if r.class_index == k)
        assert poly_um2 == pytest.approx(px * 4.0, rel=0.01), (k, poly_um2 / (px * 4.0))


def _fragmented_map(seed: int, shape: tuple[int, int] = (600, 700)) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    fields = [cv2.GaussianBlur(rng.random(shape).astype(np.float32), (0, 0), s) for s in (6, 6, 3)]
    fields[2] -= 0.02
    return (np.argmax(np.stack(fields), axis=0) + 1).astype(np.uint8)


@pytest.mark.parametrize("tol_um", [0.0, 1.0])
def test_band_seams_change_nothing(tol_um):
    """Traced in many thin bands (11 seams) or in one: the same regions, areas and shapes.
    The pieces of a region meet exactly on each seam, so the merge leaves no seam trace."""
    import shapely

    from fprotoseg.worker.wsi.vectorize import absorb_small_regions

    lm = _fragmented_map(3)
    lm[:, 300:302] = 3  # a two-pixel-wide vertical line crossing every seam
    lm[:, 500] = 2  # a one-pixel-wide line: traced as a 2-point contour, buffered by GEOS
    absorb_small_regions(lm, 3, min_area_px=50 / 4.0)
    whole = _vec(lm, n_classes=3, simplify_tolerance_um=tol_um)
    banded = _vec(lm, n_classes=3, simplify_tolerance_um=tol_um, band_bytes=50 * lm.shape[1])
    assert _band_rows(lm.shape[1], 50 * lm.shape[1]) == 64
    for k in range(3):
        a = [r for r in whole if r.class_index == k]
        b = [r for r in banded if r.class_index == k]
        assert len(a) == len(b), k
        assert all(r.geometry.is_valid for r in b)
        ua = shapely.union_all([r.geometry for r in a])
        ub = shapely.union_all([r.geometry for r in b])
        # pieces are not simplified within a pixel of a seam, so shapes differ there, only there
        seams = shapely.union_all(
            [shapely.box(0, (y - 2) * 4, lm.shape[1] * 4, (y + 2) * 4) for y in range(64, lm.shape[0], 64)]
        )
        away = ua.symmetric_difference(ub).difference(seams)
        # away from seams the outlines differ only by slivers (each piece solves its own offset
        # and Douglas-Peucker splits a piece's rings elsewhere): nothing survives an erosion by
        # the tolerance plus a quarter output pixel (level-0 px: 4 per output px, 2 µm/px)
        assert away.buffer(-(1.0 + tol_um / 2.0 * 4)).area < 1e-6 * ua.area, k
        assert ua.symmetric_difference(ub).area / ua.area < 0.01, k
        # merged across the seams: the largest region is as large as when traced whole
        assert b[0].area_um2 == pytest.approx(a[0].area_um2, rel=0.003)
        assert sum(r.area_um2 for r in b) == pytest.approx(sum(r.area_um2 for r in a), rel=0.003)


def test_simplified_regions_keep_their_pixel_area():
    """Per region (not only per class): the offset that follows simplification restores each
    region's own pixel count, so small regions are not inflated by Douglas-Peucker's corners."""
    import cv2

    lm = _fragmented_map(5, (400, 400))
    regions = _vec(lm, n_classes=3, simplify_tolerance_um=1.0, min_region_area_um2=400.0)
    assert len(regions) > 20
    for r in regions:
        x0, y0, x1, y1 = (round(v / 4) for v in r.geometry.bounds)
        window = (lm[y0:y1, x0:x1] == r.class_index + 1).astype(np.uint8)
        stats = cv2.connectedComponentsWithStats(window, connectivity=8)[2]
        px = stats[1:, cv2.CC_STAT_AREA].max()  # the region is the largest component in its box
        assert r.area_um2 == pytest.approx(px * 4.0, rel=0.02)
        assert r.geometry.area / 16 == pytest.approx(px, rel=0.02)


def test_areas_of_regions_at_the_slide_edge_are_those_of_their_clipped_polygons(tmp_path, shared_data):
    """Tissue running off the right and bottom edges of a slide whose size is not a multiple of the
    output pixel: the last output pixels reach past the slide, the polygons are clipped to it, and
    ``measurements.area_um2`` must be the area of the polygon it annotates, not of the unclipped one."""
    import json

    import shapely
    from shapely.geometry import shape

    from fprotoseg.worker.wsi.pipeline import PipelineOptions, run
    from tests.stubs import (
        CLASS_PERMUTATIONS,
        GLASS_RGB,
        ChannelStubSegmenter,
        load_textures,
        mosaic,
        write_pyramid_tiff,
    )

    width, height, mpp, output_mpp = 1001, 803, 1.0, 8.0  # the last output px overhang by 7 and 5 px
    rgb = np.empty((height, width, 3), np.uint8)
    rgb[:] = GLASS_RGB
    textures = load_textures(shared_data / "patches")
    tissue = mosaic(textures, height, width, mpp, seed=3)[:, :, list(CLASS_PERMUTATIONS[0])]
    rgb[300:, 400:] = tissue[300:, 400:]  # class 0, touching the right and bottom edges
    slide = write_pyramid_tiff(tmp_path / "edge.tiff", rgb, mpp, 1)
    result = run(slide, tmp_path / "out", ChannelStubSegmenter(),
                 options=PipelineOptions(output_mpp=output_mpp, write_overlay=False))
    features = json.loads(result.files["geojson"].read_text())["features"]
    at_edge = 0
    for feat in features:
        geom = shape(feat["geometry"])
        minx, miny, maxx, maxy = geom.bounds
        assert minx >= 0 and miny >= 0 and maxx <= width and maxy <= height
        at_edge += maxx == width or maxy == height
        expected_um2 = shapely.area(geom) * mpp * mpp
        assert feat["properties"]["measurements"]["area_um2"] == pytest.approx(expected_um2, rel=1e-4)
    assert at_edge >= 1
