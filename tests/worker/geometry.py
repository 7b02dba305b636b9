"""Helpers shared by the pipeline tests: rasterise GeoJSON back, and QuPath's import rules."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def rasterize_features(
    features: Sequence[dict[str, Any]],
    class_names: Sequence[str],
    *,
    slide_mpp: float,
    grid_mpp: float,
    shape: tuple[int, int],
) -> np.ndarray:
    """Label raster (0 = none, k + 1 = class k) of the features, pixel centres sampled."""
    import cv2

    shift = 4
    one = 1 << shift
    out = np.zeros(shape, dtype=np.uint8)
    scale = slide_mpp / grid_mpp

    def ring_pts(ring: Sequence[Sequence[float]]) -> np.ndarray:
        arr = (np.asarray(ring, dtype=np.float64) * scale - 0.5) * one
        return np.round(arr).astype(np.int32)

    for feat in features:
        k = class_names.index(feat["properties"]["classification"]["name"])
        geom = feat["geometry"]
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        layer = np.zeros(shape, dtype=np.uint8)
        for poly in polys:
            cv2.fillPoly(layer, [ring_pts(poly[0])], 1, lineType=cv2.LINE_8, shift=shift)
            for hole in poly[1:]:
                cv2.fillPoly(layer, [ring_pts(hole)], 0, lineType=cv2.LINE_8, shift=shift)
        out[layer > 0] = k + 1
    return out


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def qupath_rule_violations(collection: dict[str, Any], width_px: int, height_px: int) -> list[str]:
    """Everything QuPath's GeoJSON import would reject or mis-read, as readable strings."""
    import shapely
    from shapely.geometry import shape as to_shape

    problems: list[str] = []
    if collection.get("type") != "FeatureCollection":
        problems.append("not a FeatureCollection")
    for i, feat in enumerate(collection.get("features", [])):
        where = f"feature {i}"
        if feat.get("type") != "Feature":
            problems.append(f"{where}: type {feat.get('type')!r}")
        props = feat.get("properties") or {}
        if props.get("objectType") != "annotation":
            problems.append(f"{where}: objectType {props.get('objectType')!r}")
        cls = props.get("classification") or {}
        color = cls.get("color")
        if not isinstance(cls.get("name"), str) or not cls.get("name"):
            problems.append(f"{where}: classification without a name")
        if not (isinstance(color, list) and len(color) == 3 and all(isinstance(v, int) and 0 <= v <= 255
                                                                    for v in color)):
            problems.append(f"{where}: classification color {color!r} is not [r, g, b]")
        area = (props.get("measurements") or {}).get("area_um2")
        if not (isinstance(area, (int, float)) and area > 0 and math.isfinite(area)):
            problems.append(f"{where}: measurements.area_um2 {area!r}")
        geom = feat.get("geometry") or {}
        if geom.get("type") not in ("Polygon", "MultiPolygon"):
            problems.append(f"{where}: geometry type {geom.get('type')!r}")
            continue
        polys = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        if geom["type"] == "MultiPolygon" and len(polys) < 2:
            problems.append(f"{where}: MultiPolygon with a single part")
        for poly in polys:
            for ring in poly:
                if len(ring) < 4:
                    problems.append(f"{where}: ring of {len(ring)} positions")
                if ring[0] != ring[-1]:
                    problems.append(f"{where}: ring not closed")
                arr = np.asarray(ring, dtype=np.float64)
                if arr.min() < 0 or (arr[:, 0] > width_px).any() or (arr[:, 1] > height_px).any():
                    problems.append(f"{where}: coordinates outside the slide")
        g = to_shape(geom)
        if not g.is_valid:
            problems.append(f"{where}: invalid geometry ({shapely.is_valid_reason(g)})")
    return problems
