"""Per-region artefacts of a slide at the QC resolution: out of focus, pen ink, over-exposure, folds.

Why these four: each makes the network score something that is not the tissue as cut and stained
(a blurred area has no nuclear texture, ink and folds change the colour the classes are told
apart by, a washed-out area has none). Each pixel gets a bit per artefact (:data:`ARTEFACT_BITS`)
in one uint8 map at about the output µm/px; the pipeline leaves flagged pixels out of the class
areas and polygons, and ``qc.json`` reports the area of each.

The slide is read once at that resolution, chunk by chunk (never whole), with the same threaded
reader the tissue stage uses. Focus is judged per block (:data:`FOCUS_BLOCK_UM`), normalised to
the slide's own sharpest tissue, in a second step over the small block table; ink, over-exposure
and folds per pixel, then kept only as connected areas large enough to be more than a dark nucleus
or a lumen. Thresholds are named constants here and are copied into ``qc.json``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fprotoseg.model.stain_norm import OD_LUT, STAINED_MIN_OD
from fprotoseg.worker.wsi.buffers import anonymous_array
from fprotoseg.worker.wsi.slide import Slide
from fprotoseg.worker.wsi.tissue import TissueMask

# one bit per artefact in the artefact map (a pixel may carry several)
ARTEFACT_BITS: dict[str, int] = {"out_of_focus": 1, "pen_ink": 2, "over_exposed": 4, "fold": 8}

# --- focus: band-energy ratio (detail finer than FOCUS_FINE_UM over detail between the two scales)
FOCUS_BLOCK_UM = 64.0  # a block is judged as a whole
# The scan's coarsest resolution: the focus bands (2 and 4 µm sigmas) need pixels of 2 µm or finer
# to tell apart, so a coarse output resolution (8 µm/px) must not coarsen the scan with it.
MAX_SCAN_MPP = 2.0
FOCUS_FINE_UM = 2.0  # Gaussian sigma of the fine band
FOCUS_COARSE_UM = 4.0  # Gaussian sigma of the coarser band
FOCUS_MIN_TISSUE_FRACTION = 0.5  # blocks with less tissue are not judged
FOCUS_MIN_STD = 4.0  # grey levels: a flat block (fat, glass) has no texture to judge
FOCUS_REFERENCE_PERCENTILE = 90.0  # the slide's sharp tissue
FOCUS_REFERENCE_FLOOR = 3.0  # a slide blurred all over still has a sharp reference to compare to
FOCUS_RELATIVE_THRESHOLD = 0.3  # a block below this share of the reference is out of focus

# --- pen ink (OpenCV HSV: hue 0..180); H&E has no green and no saturated pure blue
INK_GREEN_HUE = (35, 90)
INK_GREEN_MIN_SATURATION = 60
INK_BLUE_HUE = (95, 125)
INK_BLUE_MIN_SATURATION = 120
INK_BLACK_MAX_VALUE = 35
INK_MIN_AREA_UM2 = 1_000.0  # a stroke, not a dark nucleus or a few blue pixels

# --- over-exposure / washed-out tissue (air bubbles, lamp flare): every channel near white
OVEREXPOSED_MIN_CHANNEL = 245
OVEREXPOSED_MIN_AREA_UM2 = 2_500.0  # larger than a filled lumen of the tissue mask (2,000 µm²)

# --- folds: tissue twice as thick absorbs about twice as much light
FOLD_OD_FACTOR = 2.2  # optical density over this multiple of the slide's median tissue density
FOLD_MIN_OD = 1.2  # ... and over this absolute sum of RGB optical densities
FOLD_MIN_AREA_UM2 = 10_000.0

STAIN_SAMPLES_PER_CHUNK = 4096


def thresholds() -> dict[str, object]:
    """Every threshold of this module, as ``qc.json`` records them."""
    return {
        "focus": {
            "block_um": FOCUS_BLOCK_UM,
            "fine_sigma_um": FOCUS_FINE_UM,
            "coarse_sigma_um": FOCUS_COARSE_UM,
            "reference_percentile": FOCUS_REFERENCE_PERCENTILE,
            "reference_floor": FOCUS_REFERENCE_FLOOR,
            "relative_threshold": FOCUS_RELATIVE_THRESHOLD,
            "min_tissue_fraction": FOCUS_MIN_TISSUE_FRACTION,
            "min_grey_std": FOCUS_MIN_STD,
        },
        "pen_ink": {
            "green_hue": list(INK_GREEN_HUE),
            "green_min_saturation": INK_GREEN_MIN_SATURATION,
            "blue_hue": list(INK_BLUE_HUE),
            "blue_min_saturation": INK_BLUE_MIN_SATURATION,
            "black_max_value": INK_BLACK_MAX_VALUE,
            "min_area_um2": INK_MIN_AREA_UM2,
        },
        "over_exposed": {"min_channel": OVEREXPOSED_MIN_CHANNEL, "min_area_um2": OVEREXPOSED_MIN_AREA_UM2},
        "fold": {"od_factor": FOLD_OD_FACTOR, "min_od": FOLD_MIN_OD, "min_area_um2": FOLD_MIN_AREA_UM2},
    }


@dataclass
class RegionScan:
    """What one pass over the slide at ``mpp`` found.

    ``artefacts``: uint8 (h, w) of :data:`ARTEFACT_BITS`, at ``mpp`` µm/px, origin at the slide's
    top-left corner; ``tissue_px`` the tissue pixels at that resolution; ``od_samples``: (n, 3)
    optical densities of tissue pixels for the stain estimate.
    """

    mpp: float
    artefacts: np.ndarray
    tissue_px: int
    od_samples: np.ndarray
    focus_reference: float
    focus_threshold: float
    area_um2: dict[str, float] = field(default_factory=dict)



def _tissue_window(tissue: TissueMask, y: int, x: int, h: int, w: int, mpp: float) -> np.ndarray:
    """The tissue mask under the pixels (y..y+h, x..x+w) at ``mpp`` (nearest pixel centre)."""
    scale = mpp / tissue.mpp
    rows = np.minimum(((np.arange(y, y + h) + 0.5) * scale).astype(np.int64), tissue.shape[0] - 1)
    cols = np.minimum(((np.arange(x, x + w) + 0.5) * scale).astype(np.int64), tissue.shape[1] - 1)
    r0, c0 = int(rows[0]), int(cols[0])
    window = tissue.window(r0, int(rows[-1]) + 1, c0, int(cols[-1]) + 1)
    return window[np.ix_(rows - r0, cols - c0)]


def _keep_large(mask: np.ndarray, min_px: int, open_px: int = 1) -> np.ndarray:
    """``mask`` opened by ``open_px`` and without connected areas smaller than ``min_px``."""
    import cv2

    m = mask.astype(np.uint8)
    if open_px > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * open_px + 1, 2 * open_px + 1))
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, kernel)
    if not m.any():
        return m.astype(bool)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels]


def _ink(hsv: np.ndarray) -> np.ndarray:
    """Pixels of green, blue or black marker colour (before the area filter)."""
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    green = (hue >= INK_GREEN_HUE[0]) & (hue <= INK_GREEN_HUE[1]) & (sat >= INK_GREEN_MIN_SATURATION)
    blue = (hue >= INK_BLUE_HUE[0]) & (hue <= INK_BLUE_HUE[1]) & (sat >= INK_BLUE_MIN_SATURATION)
    return green | blue | (val <= INK_BLACK_MAX_VALUE)


class _FocusBlocks:
    """Per-block sums of the focus features, filled chunk by chunk (blocks may straddle chunks)."""

    def __init__(self, shape: tuple[int, int], block_px: int) -> None:
        self.block_px = block_px
        self.shape = (math.ceil(shape[0] / block_px), math.ceil(shape[1] / block_px))
        n = self.shape[0] * self.shape[1]
        self.fine = np.zeros(n)
        self.coarse = np.zeros(n)
        self.grey = np.zeros(n)
        self.grey2 = np.zeros(n)
        self.tissue = np.zeros(n)
        self.count = np.zeros(n)

    def add(
        self, y: int, x: int, grey: np.ndarray, fine: np.ndarray, coarse: np.ndarray, tissue: np.ndarray
    ) -> None:
        h, w = grey.shape
        b = self.block_px
        # the chunk's rows and columns where a block of the slide-wide grid starts
        rows = np.unique(np.r_[0, np.arange((-y) % b, h, b)])
        cols = np.unique(np.r_[0, np.arange((-x) % b, w, b)])
        by0, bx0 = y // b, x // b
        n_rows, n_cols = len(rows), len(cols)
        grid = self.shape

        def sums(a: np.ndarray) -> np.ndarray:
            return np.add.reduceat(np.add.reduceat(a, rows, axis=0, dtype=np.float64), cols, axis=1)

        heights = np.diff(np.r_[rows, h])[:, None]
        widths = np.diff(np.r_[cols, w])[None, :]
        for total, part in (
            (self.fine, sums(fine)),
            (self.coarse, sums(coarse)),
            (self.grey, sums(grey)),
            (self.grey2, sums(grey * grey)),
            (self.tissue, sums(tissue.astype(np.float32))),
            (self.count, (heights * widths).astype(np.float64)),
        ):
            total.reshape(grid)[by0 : by0 + n_rows, bx0 : bx0 + n_cols] += part

    def judged_ratios(self) -> tuple[np.ndarray, np.ndarray]:
        """(ratio per block, bool: the block has enough tissue and texture to be judged)."""
        count = np.maximum(self.count, 1)
        std = np.sqrt(np.maximum(self.grey2 / count - (self.grey / count) ** 2, 0))
        judged = (self.tissue / count >= FOCUS_MIN_TISSUE_FRACTION) & (std >= FOCUS_MIN_STD)
        ratio = self.fine / np.maximum(self.coarse, 1e-6)
        return ratio.reshape(self.shape), judged.reshape(self.shape)


def scan_regions(slide: Slide, tissue: TissueMask, target_mpp: float, threads: int = 1) -> RegionScan:
    """Read the slide once at about ``target_mpp`` and map its artefacts (see the module doc)."""
    import cv2

    _, _, mpp, (h, w) = slide.scaled_geometry(target_mpp)
    artefacts = anonymous_array((h, w), np.uint8)
    artefacts[:] = 0
    block_px = max(4, round(FOCUS_BLOCK_UM / mpp))
    blocks = _FocusBlocks((h, w), block_px)
    fine_sigma, coarse_sigma = max(0.5, FOCUS_FINE_UM / mpp), max(1.0, FOCUS_COARSE_UM / mpp)
    px_um2 = mpp * mpp
    ink_min_px = max(1, math.ceil(INK_MIN_AREA_UM2 / px_um2))
    bright_min_px = max(1, math.ceil(OVEREXPOSED_MIN_AREA_UM2 / px_um2))
    rng = np.random.default_rng(0)
    samples: list[np.ndarray] = []
    od_hist = np.zeros(256, dtype=np.int64)  # summed OD of tissue pixels, in 0.02 steps (0..5.12)
    tissue_px = 0
    od_lut = OD_LUT  # optical density per uint8 value: a table look-up, not a log per pixel
    for y, x, chunk in slide.iter_scaled(target_mpp, threads=threads):
        ch, cw = chunk.shape[:2]
        in_tissue = _tissue_window(tissue, y, x, ch, cw, mpp)
        tissue_px += int(np.count_nonzero(in_tissue))
        grey = cv2.cvtColor(chunk, cv2.COLOR_RGB2GRAY).astype(np.float32)
        g1 = cv2.GaussianBlur(grey, (0, 0), fine_sigma)
        g2 = cv2.GaussianBlur(grey, (0, 0), coarse_sigma)
        blocks.add(y, x, grey, (grey - g1) ** 2, (g1 - g2) ** 2, in_tissue)

        hsv = cv2.cvtColor(chunk, cv2.COLOR_RGB2HSV)
        ink = _keep_large(_ink(hsv), ink_min_px)
        r, g, b = chunk[..., 0], chunk[..., 1], chunk[..., 2]
        darkest = np.minimum(np.minimum(r, g), b)
        bright = _keep_large(in_tissue & (darkest >= OVEREXPOSED_MIN_CHANNEL), bright_min_px)
        view = artefacts[y : y + ch, x : x + cw]
        view |= ink.astype(np.uint8) * ARTEFACT_BITS["pen_ink"]
        view |= bright.astype(np.uint8) * ARTEFACT_BITS["over_exposed"]

        od_sum = od_lut[r] + od_lut[g] + od_lut[b]
        scored = in_tissue & ~ink
        od_bins = np.minimum((od_sum[scored] * 50).astype(np.int64), 255)  # 0.02 steps
        od_hist += np.bincount(od_bins, minlength=256)
        picked = od_lut[chunk[scored & (od_sum > STAINED_MIN_OD)]]
        if len(picked) > STAIN_SAMPLES_PER_CHUNK:
            picked = picked[rng.choice(len(picked), STAIN_SAMPLES_PER_CHUNK, replace=False)]
        samples.append(picked)

    # folds: a second look at the (small) OD histogram gives the slide's typical tissue density
    median_od = _median_from_hist(od_hist, 0.02)
    fold_od = max(FOLD_MIN_OD, FOLD_OD_FACTOR * median_od)
    if tissue_px and fold_od < 5.0:
        _mark_folds(slide, tissue, target_mpp, mpp, artefacts, fold_od, threads)

    ratio, judged = blocks.judged_ratios()
    reference = max(
        float(np.percentile(ratio[judged], FOCUS_REFERENCE_PERCENTILE)) if judged.any() else 0.0,
        FOCUS_REFERENCE_FLOOR,
    )
    threshold = FOCUS_RELATIVE_THRESHOLD * reference
    blurred = _with_edge_blocks(judged & (ratio < threshold), judged)
    if blurred.any():
        full = np.repeat(np.repeat(blurred, block_px, axis=0), block_px, axis=1)[:h, :w]
        for r0 in range(0, h, 512):
            band_tissue = _tissue_window(tissue, r0, 0, min(512, h - r0), w, mpp)
            artefacts[r0 : r0 + 512] |= (full[r0 : r0 + 512] & band_tissue).astype(np.uint8) * ARTEFACT_BITS[
                "out_of_focus"
            ]

    scan = RegionScan(
        mpp=mpp,
        artefacts=artefacts,
        tissue_px=tissue_px,
        od_samples=np.concatenate(samples) if samples else np.zeros((0, 3), np.float32),
        focus_reference=reference,
        focus_threshold=threshold,
    )
    scan.area_um2 = artefact_areas_um2(artefacts, mpp)
    return scan


def _with_edge_blocks(blurred: np.ndarray, judged: np.ndarray) -> np.ndarray:
    """Blocks too thin in tissue or texture to judge (tissue edges) take the verdict of a blurred
    judged neighbour: an out-of-focus field does not stop where its blocks thin out."""
    import cv2

    if not blurred.any():
        return blurred
    near = cv2.dilate(blurred.astype(np.uint8), np.ones((3, 3), np.uint8)) != 0
    return blurred | (near & ~judged)


def _median_from_hist(hist: np.ndarray, step: float) -> float:
    total = int(hist.sum())
    if not total:
        return 0.0
    return float(np.searchsorted(np.cumsum(hist), total / 2) * step)


def _mark_folds(
    slide: Slide, tissue: TissueMask, target_mpp: float, mpp: float, artefacts: np.ndarray, fold_od: float,
    threads: int,
) -> None:
    """Folds need the slide's median density first, so they take their own (cheap) look.

    The look is at 4x the QC µm/px: a fold is hundreds of µm across, and reading at a quarter
    of the pixels keeps the second look a small share of the QC stage.
    """
    import cv2

    coarse_target = target_mpp * 4
    _, _, coarse_mpp, (ch_total, cw_total) = slide.scaled_geometry(coarse_target)
    folds = np.zeros((ch_total, cw_total), dtype=bool)
    for y, x, chunk in slide.iter_scaled(coarse_target, threads=threads):
        ch, cw = chunk.shape[:2]
        od_sum = -np.log(np.maximum(chunk, 1).astype(np.float32) / 255.0).sum(axis=2)
        hsv = cv2.cvtColor(chunk, cv2.COLOR_RGB2HSV)
        dense = (od_sum > fold_od) & ~_ink(hsv) & _tissue_window(tissue, y, x, ch, cw, coarse_mpp)
        folds[y : y + ch, x : x + cw] = dense
    folds = _keep_large(folds, max(1, math.ceil(FOLD_MIN_AREA_UM2 / coarse_mpp**2)))
    if not folds.any():
        return
    h, w = artefacts.shape
    rows = np.minimum(((np.arange(h) + 0.5) * mpp / coarse_mpp).astype(np.int64), ch_total - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * mpp / coarse_mpp).astype(np.int64), cw_total - 1)
    for r0 in range(0, h, 512):
        band = folds[np.ix_(rows[r0 : r0 + 512], cols)]
        artefacts[r0 : r0 + 512] |= band.astype(np.uint8) * ARTEFACT_BITS["fold"]


def artefact_areas_um2(artefacts: np.ndarray, mpp: float) -> dict[str, float]:
    """µm² per artefact (a pixel with two artefacts counts for both) and ``any``."""
    counts = np.zeros(256, dtype=np.int64)
    for r0 in range(0, artefacts.shape[0], 512):
        counts += np.bincount(artefacts[r0 : r0 + 512].ravel(), minlength=256)
    values = np.arange(256)
    px_um2 = mpp * mpp
    areas = {name: float(counts[(values & bit) != 0].sum()) * px_um2 for name, bit in ARTEFACT_BITS.items()}
    areas["any"] = float(counts[1:].sum()) * px_um2
    return areas


def artefacts_at_output(
    artefacts: np.ndarray, shape: tuple[int, int], output_mpp: float, qc_mpp: float
) -> np.ndarray:
    """The artefact map on the label map's grid (``shape`` at ``output_mpp``), nearest pixel
    centre: what the label map leaves out, and what ``artefacts.tiff`` and the viewer show."""
    h, w = shape
    ah, aw = artefacts.shape
    out = anonymous_array((h, w), np.uint8)
    if ah == 0 or aw == 0:
        return out
    rows = np.minimum(((np.arange(h) + 0.5) * output_mpp / qc_mpp).astype(np.int64), ah - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * output_mpp / qc_mpp).astype(np.int64), aw - 1)
    for r0 in range(0, h, 256):
        out[r0 : r0 + 256] = artefacts[np.ix_(rows[r0 : r0 + 256], cols)]
    return out


def exclude_artefacts(label_map: np.ndarray, output_artefacts: np.ndarray) -> int:
    """In place: label 0 (not scored) wherever the artefact map on the output grid
    (:func:`artefacts_at_output`) flags the pixel; returns the output pixels that were tissue and
    are now excluded."""
    excluded = 0
    for r0 in range(0, label_map.shape[0], 256):
        band = label_map[r0 : r0 + 256]
        hit = (output_artefacts[r0 : r0 + 256] != 0) & (band != 0)
        excluded += int(np.count_nonzero(hit))
        band[hit] = 0
    return excluded
