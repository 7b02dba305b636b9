"""Stitch per-tile class scores into one uint8 label map at the output resolution.

Why this shape: memory is bounded by the label map (one byte per output pixel), never by the
slide. Each output pixel is taken from the one tile that owns it (the tile centre; the overlap
margin is discarded), sampled bilinearly from that tile's score map at the pixel's exact µm
position, then argmax'd. Glass comes from the tissue mask, not the network: 0 = background,
``k + 1`` = class ``k`` of the segmenter.

Why OpenCV, a batch at a time: stitching runs in the pipeline's worker threads, next to the tile
reads. ``cv2.remap`` does the bilinear sampling (edge pixels replicated) of a whole batch's
score maps in one call with the GIL released, so stitching scales with the threads; the numpy
version (:func:`sample_bilinear`, kept as the reference the tests compare against) holds the GIL
in its fancy indexing, and a call per tile held it in Python glue: each was the pipeline's
bottleneck with a fast network in turn. Tiles own disjoint windows of the label map, so several
threads may add batches at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fprotoseg.worker.wsi.buffers import anonymous_array
from fprotoseg.worker.wsi.tiling import Tile
from fprotoseg.worker.wsi.tissue import TissueMask, saturation

BACKGROUND = 0
# OpenCV's sub-pixel precision for bilinear sampling: 2**5 steps per pixel (INTER_BITS).
INTER_BITS = 5
INTER_TAB = 1 << INTER_BITS
# Rows of stacked score maps one sampling call may address (its maps are int16).
MAX_STACKED_ROWS = 32_000
# How far past the coarse tissue mask the stitcher follows the tissue at the output resolution
# (two pixels of the 4 µm/px mask: what its resolution and closing may have moved an edge by).
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

    def __init__(
        self, shape: tuple[int, int], output_mpp: float, tissue: TissueMask,
        probabilities: np.ndarray | None = None,
    ) -> None:
        """``probabilities``: an optional uint8 (C, h, w) array (a disk-backed memmap in the
        pipeline) that receives every class's softmax probability x 255 (0 on glass)."""
        self.output_mpp = output_mpp
        self.tissue = tissue
        self.label_map = anonymous_array(shape, np.uint8)
        # per output pixel, the softmax probability of the chosen class x 255 (0 on glass)
        self.confidence_map = anonymous_array(shape, np.uint8)
        self.probabilities = probabilities

    def _mask_window(
        self, bounds: tuple[int, int, int, int], origin: tuple[float, float], shape: tuple[int, int],
        pad_px: int,
    ) -> np.ndarray | bool:
        """The tissue mask, dilated by ``pad_px`` mask pixels, sampled bilinearly (edge pixels
        replicated) at ``shape`` output pixels: float32 (h, w), or a plain bool when uniform.

        ``bounds`` (y0, y1, x0, x1): the mask pixels the samples reach; ``origin`` (y, x): the
        first sample's position in mask pixels; one output pixel is ``output_mpp / mask mpp``
        mask pixels. One ``cv2.warpAffine`` (GIL released) instead of per-pixel indexing: this
        runs for every tile along a tissue edge, beside the tile reads.
        """
        import cv2

        wy0, wy1, wx0, wx1 = bounds
        # Only the window we need (plus the dilation's reach), unpacked: cost is per tile.
        sy, sx = max(0, wy0 - pad_px), max(0, wx0 - pad_px)
        support = self.tissue.window(sy, wy1 + pad_px, sx, wx1 + pad_px).view(np.uint8)
        if pad_px:
            kernel = np.ones((2 * pad_px + 1, 2 * pad_px + 1), np.uint8)
            support = cv2.dilate(support, kernel)
        support = support[wy0 - sy : wy1 - sy, wx0 - sx : wx1 - sx]
        lowest, highest = cv2.minMaxLoc(support)[:2]
        if lowest == highest:
            return bool(lowest)
        step = self.output_mpp / self.tissue.mpp
        matrix = np.array([[step, 0.0, origin[1] - wx0], [0.0, step, origin[0] - wy0]])
        return cv2.warpAffine(
            support.astype(np.float32), matrix, (shape[1], shape[0]),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE,
        )

    def _tissue_window(self, tile: Tile, rgb: np.ndarray | None = None) -> np.ndarray | bool:
        """Tissue (bool array) over the tile's owned window, or a plain bool when uniform.

        The tissue mask is coarse (about 4 µm/px, smoothed by its morphology), so along every
        tissue edge it loses a few µm of tissue that the network did score. With the tile's
        pixels (``rgb``), output pixels within :data:`EDGE_BAND_UM` of the mask are tissue where
        their own saturation passes the slide's threshold: the edge follows the tissue at the
        output resolution, and glass beside it stays glass. The mask's interior is never changed.
        """
        if tile.inside_tissue:
            return True
        o, t = self.output_mpp, self.tissue.mpp
        h, w = self.tissue.shape
        pad_px = max(1, round(EDGE_BAND_UM / t)) if rgb is not None else 0
        # Owned output pixel (j, i) samples the mask at (y_lo + j * o / t, x_lo + i * o / t)
        # (mask-pixel index convention). Fast path without per-pixel arrays (most tiles lie
        # inside tissue): the mask pixels any owned pixel could sample, i.e. floor(first) ..
        # floor(last) + 1, clipped.
        y_lo, y_hi = (tile.own_y0 + 0.5) * o / t - 0.5, (tile.own_y1 - 0.5) * o / t - 0.5
        x_lo, x_hi = (tile.own_x0 + 0.5) * o / t - 0.5, (tile.own_x1 - 0.5) * o / t - 0.5
        wy0, wy1 = min(h - 1, max(0, math.floor(y_lo))), min(h - 1, max(0, math.floor(y_hi) + 1)) + 1
        wx0, wx1 = min(w - 1, max(0, math.floor(x_lo))), min(w - 1, max(0, math.floor(x_hi) + 1)) + 1
        if self.tissue.window(wy0, wy1, wx0, wx1).all():
            return True
        if not self.tissue.window(wy0 - pad_px, wy1 + pad_px, wx0 - pad_px, wx1 + pad_px).any():
            return False
        bounds, origin = (wy0, wy1, wx0, wx1), (y_lo, x_lo)
        shape = (tile.own_y1 - tile.own_y0, tile.own_x1 - tile.own_x0)
        soft = self._mask_window(bounds, origin, shape, 0)
        core: np.ndarray | bool = soft if isinstance(soft, bool) else soft >= 0.5
        if rgb is None or core is True:
            return core
        band = self._mask_window(bounds, origin, shape, pad_px)
        if band is False:
            return core
        fine = self._fine_tissue(tile, rgb, shape)
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
        """Place one tile's (C, h, w) scores: :meth:`add_batch` with a batch of one."""
        self.add_batch([tile], scores[None], None if rgb is None else rgb[None])

    def add_batch(self, tiles: Sequence[Tile], scores: np.ndarray, rgbs: np.ndarray | None = None) -> None:
        """Place a batch of tiles' (N, C, h, w) scores; argmax per owned output pixel, glass kept at 0.

        ``rgbs``: the tiles' pixels (N, T, T, 3) as the network saw them; with them tissue edges
        are traced at the output resolution (see :meth:`_tissue_window`).

        Why a batch at a time: per tile, the sampling and argmax are a few small array calls
        whose Python glue holds the GIL; with a free network that glue was what stopped the
        stitching threads from scaling. Here they run once per batch over (N * out_h, out_w)
        arrays with the GIL released, and only the tissue check and the copy into the label map
        remain per tile. Thread-safe for distinct tiles (their owned windows never overlap).
        """
        if not len(tiles):
            return
        per_call = max(1, MAX_STACKED_ROWS // scores.shape[2])
        if len(tiles) > per_call:  # the stacked rows must fit OpenCV's int16 sampling maps
            for a in range(0, len(tiles), per_call):
                b = a + per_call
                self.add_batch(tiles[a:b], scores[a:b], None if rgbs is None else rgbs[a:b])
            return
        labels, confidence, probs = self._sample_labels(tiles, scores, self.probabilities is not None)
        for j, tile in enumerate(tiles):
            out_h, out_w = tile.own_y1 - tile.own_y0, tile.own_x1 - tile.own_x0
            if out_h <= 0 or out_w <= 0:
                continue
            window = labels[j, :out_h, :out_w]
            tissue = self._tissue_window(tile, None if rgbs is None else rgbs[j])
            target = self.label_map[tile.own_y0 : tile.own_y1, tile.own_x0 : tile.own_x1]
            sure = self.confidence_map[tile.own_y0 : tile.own_y1, tile.own_x0 : tile.own_x1]
            if tissue is True:
                target[...] = window
                sure[...] = confidence[j, :out_h, :out_w]
            elif tissue is False:
                target[...] = BACKGROUND
                sure[...] = 0
            else:
                np.copyto(target, window)
                target[~tissue] = BACKGROUND
                np.copyto(sure, confidence[j, :out_h, :out_w])
                sure[~tissue] = 0
            if probs is not None and self.probabilities is not None:
                every = self.probabilities[:, tile.own_y0 : tile.own_y1, tile.own_x0 : tile.own_x1]
                np.copyto(every, probs[:, j, :out_h, :out_w])
                if tissue is False:
                    every[...] = 0
                elif tissue is not True:
                    every[:, ~tissue] = 0

    def _sample_labels(
        self, tiles: Sequence[Tile], scores: np.ndarray, every_class: bool = False
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """uint8 (N, H, W): class + 1 of the bilinearly sampled scores at each owned output pixel
        (H, W: the largest owned window; smaller windows fill its top-left corner), uint8
        (N, H, W): the softmax probability of that class over the sampled scores, x 255, and with
        ``every_class`` uint8 (C, N, H, W): every class's softmax probability x 255 (else None).

        Output pixel (r, i) of tile j samples score position (by_j + r * sy_j, bx_j + i * sx_j)
        in the pixel-index convention of :func:`sample_bilinear`, clamped to the tile (edge
        pixels replicated). The tiles' score maps are stacked into one (N * h, w) image per class
        and sampled by one ``cv2.remap`` through fixed-point maps (1/32 px, OpenCV's own
        precision), quantised per tile so a tile's labels do not depend on its place in a batch.
        """
        import cv2

        n, n_classes, h, w = scores.shape
        o = self.output_mpp
        own = np.array([(t.own_y0, t.own_y1, t.own_x0, t.own_x1) for t in tiles], dtype=np.int64)
        geo = np.array([(t.origin_y_um, t.origin_x_um, t.span_y_um, t.span_x_um) for t in tiles])
        out_h = max(1, int((own[:, 1] - own[:, 0]).max()))
        out_w = max(1, int((own[:, 3] - own[:, 2]).max()))
        um_y, um_x = geo[:, 2] / h, geo[:, 3] / w  # µm per score pixel
        ys = ((own[:, 0:1] + 0.5 + np.arange(out_h)) * o - geo[:, 0:1]) / um_y[:, None] - 0.5
        xs = ((own[:, 2:3] + 0.5 + np.arange(out_w)) * o - geo[:, 1:2]) / um_x[:, None] - 0.5
        qy = np.round(np.clip(ys, 0, h - 1) * INTER_TAB).astype(np.int32)  # (N, H), 1/32 px
        qx = np.round(np.clip(xs, 0, w - 1) * INTER_TAB).astype(np.int32)  # (N, W)
        qy += (np.arange(n, dtype=np.int32) * (h * INTER_TAB))[:, None]  # tile j's rows in the stack
        # Written in place by broadcasting (no (N, H, W) temporaries): integer pixel (x, y) and the
        # index of the 1/32 px fraction in OpenCV's interpolation table.
        map_xy = np.empty((n, out_h, out_w, 2), dtype=np.int16)
        map_xy[..., 0] = (qx >> INTER_BITS)[:, None, :]
        map_xy[..., 1] = (qy >> INTER_BITS)[:, :, None]
        map_frac = np.empty((n, out_h, out_w), dtype=np.uint16)
        np.add(((qy & (INTER_TAB - 1)) * INTER_TAB)[:, :, None], (qx & (INTER_TAB - 1))[:, None, :],
               out=map_frac, casting="unsafe")
        grid = (n * out_h, out_w)
        stacked_xy, stacked_frac = map_xy.reshape(*grid, 2), map_frac.reshape(grid)
        best: np.ndarray | None = None
        labels = np.ones(grid, dtype=np.uint8)
        per_class = []
        for k in range(n_classes):
            stacked = np.ascontiguousarray(scores[:, k], dtype=np.float32).reshape(n * h, w)
            sampled = cv2.remap(
                stacked, stacked_xy, stacked_frac, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
            )
            per_class.append(sampled)
            if best is None:
                best = sampled.copy()
                continue
            higher = sampled > best  # strict: ties keep the lower class, as argmax does
            np.copyto(labels, np.uint8(k + 1), where=higher)
            np.maximum(best, sampled, out=best)
        # max softmax probability = 1 / sum_k exp(s_k - max), in place over the sampled maps
        assert best is not None  # a network has at least one class
        total = np.zeros(grid, dtype=np.float32)
        for sampled in per_class:
            np.subtract(sampled, best, out=sampled)
            np.exp(sampled, out=sampled)
            total += sampled
        confidence = np.empty(grid, dtype=np.uint8)
        np.divide(255.0, total, out=total)
        probs = None
        if every_class:  # p_k x 255 = exp(s_k - max) x (255 / sum), rounded like the confidence
            probs = np.empty((n_classes, *grid), dtype=np.uint8)
            for k, sampled in enumerate(per_class):
                np.multiply(sampled, total, out=sampled)
                np.rint(sampled, out=sampled)
                np.copyto(probs[k], sampled, casting="unsafe")
            probs = probs.reshape(n_classes, n, out_h, out_w)
        np.rint(total, out=total)
        np.copyto(confidence, total, casting="unsafe")
        return labels.reshape(n, out_h, out_w), confidence.reshape(n, out_h, out_w), probs
