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

from worker.buffers import anonymous_array

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


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (uint8), zeroed where the pixel is very dark (pen, black padding)."""
    import cv2

    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    sat = hsv[:, :, 1].copy()
    sat[hsv[:, :, 2] <= MAX_DARK_VALUE] = 0
    return sat


def detect_tissue(rgb: np.ndarray, mpp: float, **kwargs: float) -> TissueMask:
    """Tissue mask of an RGB image at ``mpp`` µm/px (see :func:`detect_tissue_from_saturation`)."""
    return detect_tissue_from_saturation(saturation(rgb), mpp, **kwargs)


def detect_tissue_from_saturation(
    sat: np.ndarray,
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
    are dropped. Works in place on one uint8 mask: memory is about two bytes per mask pixel.
    """
    import cv2

    otsu, _ = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = int(max(otsu, MIN_SATURATION))
    # Two mask-sized buffers outside the heap, ping-ponged: OpenCV never needs its own copy.
    mask = anonymous_array(sat.shape, np.uint8)
    spare = anonymous_array(sat.shape, np.uint8)
    cv2.threshold(sat, threshold, 1, cv2.THRESH_BINARY, dst=mask)

    close_kernel = _disk(max(1, round(close_radius_um / mpp)))
    cv2.dilate(mask, close_kernel, dst=spare)
    cv2.erode(spare, close_kernel, dst=mask)
    open_px = round(open_radius_um / mpp)
    if open_px >= 1:
        cv2.erode(mask, _disk(open_px), dst=spare)
        cv2.dilate(spare, _disk(open_px), dst=mask)
    del spare

    px_area_um2 = mpp * mpp
    _fill_small(mask, math.ceil(min_tissue_area_um2 / px_area_um2), holes=False)
    _fill_small(mask, math.ceil(min_hole_area_um2 / px_area_um2), holes=True)
    return TissueMask(mask=mask.view(bool), mpp=mpp, saturation_threshold=threshold)


def _fill_small(mask: np.ndarray, min_px: int, *, holes: bool, band_bytes: int = 4 << 20) -> None:
    """In place: erase tissue components (``holes=False``) or fill glass holes (``holes=True``)
    whose pixel-edge area is below ``min_px``.

    Contours, not a label image (no int32 copy of the mask), traced band by band so OpenCV's
    internal copy stays a few MB; a component cut by a band seam is left as it is.
    """
    import cv2

    if min_px <= 1 or not mask.any():
        return
    height, width = mask.shape
    rows = max(64, band_bytes // max(1, width))
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        band = mask[r0:r1]
        contours, hierarchy = cv2.findContours(band, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        if hierarchy is None:
            continue
        small = []
        for c, h in zip(contours, hierarchy[0], strict=True):
            if (h[3] != -1) != holes:
                continue
            _, y, _, bh = cv2.boundingRect(c)
            if (y == 0 and r0 > 0) or (y + bh == r1 - r0 and r1 < height):
                continue
            if cv2.contourArea(c) + cv2.arcLength(c, True) / 2 + 1 < min_px:
                small.append(c)
        if small:
            # a hole contour runs along the tissue pixels around the hole: filling it fills the hole
            cv2.drawContours(band, small, -1, 1 if holes else 0, thickness=cv2.FILLED)
