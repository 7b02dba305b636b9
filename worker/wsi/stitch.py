"""Stitch per-tile class scores into one uint8 label map at the output resolution.

Why this shape: memory is bounded by the label map (one byte per output pixel), never by the
slide. Each output pixel is taken from the one tile that owns it (the tile centre; the overlap
margin is discarded), sampled bilinearly from that tile's score map at the pixel's exact µm
position, then argmax'd. Glass comes from the tissue mask, not the network: 0 = background,
``k + 1`` = class ``k`` of the segmenter.

Why OpenCV for the sampling: ``add`` runs for every tile in the pipeline's worker threads, next to
the tile reads. ``cv2.warpAffine`` does the same bilinear sampling (edge pixels replicated) with
the GIL released, so stitching scales with the threads; the numpy version
(:func:`sample_bilinear`, kept as the reference the tests compare against) holds the GIL in its
fancy indexing and was the pipeline's bottleneck with a fast network. Tiles own disjoint windows
of the label map, so several threads may ``add`` at once.
"""

from __future__ import annotations

import math

import numpy as np

from fprotoseg.worker.wsi.buffers import anonymous_array
from fprotoseg.worker.wsi.tiling import Tile
from fprotoseg.worker.wsi.tissue import TissueMask, saturation

BACKGROUND = 0
# How far past the coarse tissue mask the stitcher follows the tissue at the output resolution
# (the tissue mask's opening radius: what its morphology may have shaved off an edge).
EDGE_BAND_UM = 8.0


def _axis(src: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights for linear interpolation along one axis (edge pixels replicated)."""
    lo = np.floor(src)
    w = (src - lo).astype(np.float32)
    i0 = np.clip(lo.astype(np.int64), 0, n - 1)
    # From lo, not from the clipped i0: before the first pixel both neighbours are pixel 0.
    i1 = np.clip(lo.astype(np.int64) + 1, 0, n - 1)
    return i0, i1, w


def sample_bilinear(arr: np.ndarray, src_y: np.ndarray, src_x: np.ndarray) -> np.ndarray:
    """Sample a (C, h, w) array at the separable grid ``src_y x src_x`` (pixel-index coordinates)."""
    _, h, w = arr.shape
    y0, y1, wy = _axis(src_y, h)
    x0, x1, wx = _axis(src_x, w)
    rows = arr[:, y0, :] * (1 - wy)[None, :, None] + arr[:, y1, :] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx)[None, None, :] + rows[:, :, x1] * wx[None, None, :]


class LabelMapStitcher:
    """Owns the label map; ``add`` writes one tile's owned window."""

    def __init__(self, shape: tuple[int, int], output_mpp: float, tissue: TissueMask) -> None:
        self.output_mpp = output_mpp
        self.tissue = tissue
        self.label_map = anonymous_array(shape, np.uint8)

    def _mask_window(self, ys: np.ndarray, xs: np.ndarray, pad_px: int) -> np.ndarray | bool:
        """The tissue mask, dilated by ``pad_px`` mask pixels, sampled bilinearly at output pixels
        whose mask-pixel coordinates are ``ys x xs``: float (h, w), or a plain bool when uniform."""
        import cv2

        h, w = self.tissue.shape
        y0, y1, wy = _axis(ys, h)
        x0, x1, wx = _axis(xs, w)
        by, ey, bx, ex = int(y0[0]), int(y1[-1]) + 1, int(x0[0]), int(x1[-1]) + 1
        # Only the window we need (plus the dilation's reach), unpacked: cost is per tile.
        sy, sx = max(0, by - pad_px), max(0, bx - pad_px)
        support = self.tissue.window(sy, ey + pad_px, sx, ex + pad_px)
        if pad_px and support.any():
            kernel = np.ones((2 * pad_px + 1, 2 * pad_px + 1), np.uint8)
            support = cv2.dilate(support.view(np.uint8), kernel).astype(bool)
        support = support[by - sy : ey - sy, bx - sx : ex - sx]
        if support.all():
            return True
        if not support.any():
            return False
        y0, y1, x0, x1 = y0 - by, y1 - by, x0 - bx, x1 - bx
        r0 = support[y0][:, x0].astype(np.float32)
        r1 = support[y0][:, x1].astype(np.float32)
        r2 = support[y1][:, x0].astype(np.float32)
        r3 = support[y1][:, x1].astype(np.float32)
        top = r0 * (1 - wx)[None, :] + r1 * wx[None, :]
        bottom = r2 * (1 - wx)[None, :] + r3 * wx[None, :]
        return top * (1 - wy)[:, None] + bottom * wy[:, None]

    def _tissue_window(self, tile: Tile, rgb: np.ndarray | None = None) -> np.ndarray | bool:
        """Tissue (bool array) over the tile's owned window, or a plain bool when uniform.

        The tissue mask is coarse (about 4 µm/px, smoothed by its morphology), so along every
        tissue edge it loses a few µm of tissue that the network did score. With the tile's
        pixels (``rgb``), output pixels within :data:`EDGE_BAND_UM` of the mask are tissue where
        their own saturation passes the slide's threshold: the edge follows the tissue at the
        output resolution, and glass beside it stays glass. The mask's interior is never changed.
        """
        o, t = self.output_mpp, self.tissue.mpp
        h, w = self.tissue.shape
        pad_px = max(1, round(EDGE_BAND_UM / t)) if rgb is not None else 0
        # Fast path without per-pixel arrays (most tiles lie inside tissue): the mask pixels any
        # owned pixel could sample, i.e. floor(first) .. floor(last) + 1, clipped.
        y_lo, y_hi = (tile.own_y0 + 0.5) * o / t - 0.5, (tile.own_y1 - 0.5) * o / t - 0.5
        x_lo, x_hi = (tile.own_x0 + 0.5) * o / t - 0.5, (tile.own_x1 - 0.5) * o / t - 0.5
        wy0, wy1 = min(h - 1, max(0, math.floor(y_lo))), min(h - 1, max(0, math.floor(y_hi) + 1)) + 1
        wx0, wx1 = min(w - 1, max(0, math.floor(x_lo))), min(w - 1, max(0, math.floor(x_hi) + 1)) + 1
        if self.tissue.window(wy0, wy1, wx0, wx1).all():
            return True
        if not self.tissue.window(wy0 - pad_px, wy1 + pad_px, wx0 - pad_px, wx1 + pad_px).any():
            return False
        ys = (np.arange(tile.own_y0, tile.own_y1) + 0.5) * o / t - 0.5
        xs = (np.arange(tile.own_x0, tile.own_x1) + 0.5) * o / t - 0.5
        soft = self._mask_window(ys, xs, 0)
        core: np.ndarray | bool = soft if isinstance(soft, bool) else soft >= 0.5
        if rgb is None or core is True:
            return core
        band = self._mask_window(ys, xs, pad_px)
        if band is False:
            return core
        fine = self._fine_tissue(tile, rgb, (len(ys), len(xs)))
        if band is not True:
            fine &= band > 0
        return fine | core

    def _fine_tissue(self, tile: Tile, rgb: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """bool (h, w): owned output pixels whose saturation, from the tile's own pixels averaged
        over one output pixel, reaches the slide's tissue threshold.

        The owned window is cut from the tile and area-averaged to the output grid first, so the
        colour conversion runs on output pixels only (a few % of the tile's): edge tiles are
        common on biopsies and this runs in the stitcher's threads, beside the tile reads.
        """
        import cv2

        img_h, img_w = rgb.shape[:2]
        um_per_img_x, um_per_img_y = tile.span_x_um / img_w, tile.span_y_um / img_h
        o = self.output_mpp
        x0 = (tile.own_x0 * o - tile.origin_x_um) / um_per_img_x
        x1 = (tile.own_x1 * o - tile.origin_x_um) / um_per_img_x
        y0 = (tile.own_y0 * o - tile.origin_y_um) / um_per_img_y
        y1 = (tile.own_y1 * o - tile.origin_y_um) / um_per_img_y
        ix0, iy0 = max(0, round(x0)), max(0, round(y0))
        ix1, iy1 = min(img_w, max(ix0 + 1, round(x1))), min(img_h, max(iy0 + 1, round(y1)))
        window = np.ascontiguousarray(rgb[iy0:iy1, ix0:ix1])
        small = cv2.resize(window, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
        return saturation(small) >= self.tissue.saturation_threshold

    def add(self, tile: Tile, scores: np.ndarray, rgb: np.ndarray | None = None) -> None:
        """Place one tile's (C, h, w) scores; argmax per owned output pixel, glass kept at 0.

        ``rgb``: the tile's pixels as the network saw them; with them tissue edges are traced at
        the output resolution (see :meth:`_tissue_window`).

        Thread-safe for distinct tiles (their owned windows never overlap).
        """
        import cv2

        n_classes, h, w = scores.shape
        o = self.output_mpp
        out_h, out_w = tile.own_y1 - tile.own_y0, tile.own_x1 - tile.own_x0
        if out_h <= 0 or out_w <= 0:
            return
        um_per_score_y = tile.span_y_um / h
        um_per_score_x = tile.span_x_um / w
        # Output pixel (j, i) samples score position (i * sx + bx, j * sy + by), in the same
        # pixel-index convention as sample_bilinear.
        sx, sy = o / um_per_score_x, o / um_per_score_y
        bx = ((tile.own_x0 + 0.5) * o - tile.origin_x_um) / um_per_score_x - 0.5
        by = ((tile.own_y0 + 0.5) * o - tile.origin_y_um) / um_per_score_y - 0.5
        matrix = np.array([[sx, 0.0, bx], [0.0, sy, by]], dtype=np.float64)
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        best: np.ndarray | None = None
        labels = np.ones((out_h, out_w), dtype=np.uint8)
        for k in range(n_classes):
            channel = np.ascontiguousarray(scores[k], dtype=np.float32)
            sampled = cv2.warpAffine(
                channel, matrix, (out_w, out_h), flags=flags, borderMode=cv2.BORDER_REPLICATE
            )
            if best is None:
                best = sampled
                continue
            higher = sampled > best  # strict: ties keep the lower class, as argmax does
            labels[higher] = k + 1
            np.maximum(best, sampled, out=best)
        tissue = self._tissue_window(tile, rgb)
        if tissue is False:
            labels[:] = BACKGROUND
        elif tissue is not True:
            labels[~tissue] = BACKGROUND
        self.label_map[tile.own_y0 : tile.own_y1, tile.own_x0 : tile.own_x1] = labels
