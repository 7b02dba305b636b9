"""JPEG round trips of training crops: what a slide scanner does to the pixels a network reads.

Why: the labelled crops are lossless PNGs, while slides are stored as JPEG tiles (Aperio's default
quality is 70, a mosaic of the same crops at quality 90 changes a pixel by about 6 levels per
channel on average). Under CV, the fold networks of the shipped recipe lost 0.07 mIoU on the same
crops read back from a quality-90 mosaic slide instead of the PNGs (fold 1, seed 0;
``bench/slide_gap.py``). Training on crops that went through the same compression teaches the
network to read through its block and chroma artefacts.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def jpeg_roundtrip(
    batch: np.ndarray, rng: np.random.Generator, prob: float, quality: tuple[int, int] = (60, 95)
) -> np.ndarray:
    """Each (N, H, W, 3) uint8 crop, with probability ``prob``, encoded as a JPEG of a quality
    drawn from ``quality`` (inclusive; 4:2:0 chroma, libjpeg's default) and decoded again.

    No draw from ``rng`` when ``prob`` is 0, so a recipe without it trains exactly as before.
    """
    if prob <= 0:
        return batch
    lo, hi = quality
    if not 1 <= lo <= hi <= 100:
        raise ValueError(f"JPEG quality range {quality} is not within 1..100")
    out = batch.copy()
    for i in range(batch.shape[0]):
        if rng.random() >= prob:
            continue
        out[i] = jpeg_at_quality(batch[i], int(rng.integers(lo, hi + 1)))
    return out


def jpeg_at_quality(rgb: np.ndarray, quality: int) -> np.ndarray:
    """One (H, W, 3) uint8 image encoded as a JPEG of ``quality`` (4:2:0 chroma, libjpeg's
    default, as scanners store tiles) and decoded again: what a slide at that quality holds."""
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality {quality} is not within 1..100")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as img:
        return np.asarray(img.convert("RGB"))
