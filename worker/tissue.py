"""Tissue detection on a low-resolution image, so glass never reaches the network.

Why saturation: H&E stains are coloured, glass and slide background are grey/white (low
saturation) whatever the scanner's white balance. Otsu picks the split per slide; a floor keeps a
blank slide from turning its noise into "tissue". Morphology sizes are in µm, so the result does
not depend on the resolution the mask is computed at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Saturation (0..255, OpenCV HSV) below which a pixel is glass whatever Otsu says.
MIN_SATURATION = 20
# Very dark pixels (pen, slide edge, black padding) are not tissue either.
MAX_DARK_VALUE = 30


@dataclass(frozen=True)
class TissueMask:
    """Boolean mask at ``mpp`` µm/px, origin at the slide's top-left corner."""

    mask: np.ndarray  # bool (h, w)
    mpp: float
    saturation_threshold: int

    @property
    def area_um2(self) -> float:
        return float(self.mask.sum()) * self.mpp * self.mpp


def _disk(radius_px: int) -> np.ndarray:
    import cv2

    size = 2 * radius_px + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def detect_tissue(
    rgb: np.ndarray,
    mpp: float,
    *,
    close_radius_um: float = 16.0,
    open_radius_um: float = 8.0,
    min_tissue_area_um2: float = 10_000.0,
    min_hole_area_um2: float = 2_000.0,
) -> TissueMask:
    """Saturation/Otsu tissue mask with morphology and area filters sized in µm.

    Holes smaller than ``min_hole_area_um2`` (nuclei-free cytoplasm, small lumina) are filled;
    larger ones (real lumina, fat) stay glass. Components below ``min_tissue_area_um2`` (dust)
    are dropped.
    """
    import cv2

    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat, val = hsv[:, :, 1], hsv[:, :, 2]
    del hsv
    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = int(max(otsu, MIN_SATURATION))
    mask = ((sat > threshold) & (val > MAX_DARK_VALUE)).astype(np.uint8)
    del sat, val

    close_px = max(1, round(close_radius_um / mpp))
    open_px = round(open_radius_um / mpp)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disk(close_px))
    if open_px >= 1:
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disk(open_px))

    px_area_um2 = mpp * mpp
    mask = _drop_small_components(mask, math.ceil(min_tissue_area_um2 / px_area_um2))
    # Fill small holes: glass islands below the hole size become tissue.
    holes = _drop_small_components(1 - mask, math.ceil(min_hole_area_um2 / px_area_um2))
    mask = (1 - holes).astype(bool)
    return TissueMask(mask=mask, mpp=mpp, saturation_threshold=threshold)


def _drop_small_components(mask: np.ndarray, min_px: int) -> np.ndarray:
    """Zero the 8-connected components of a 0/1 uint8 mask smaller than ``min_px`` pixels."""
    import cv2

    if min_px <= 1 or not mask.any():
        return mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels].astype(np.uint8)
