"""JPEG round trips of training crops (model/training/compression.py), on real H&E crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _real_crops(shared_data: Path, n: int = 8, px: int = 112) -> np.ndarray:
    crops = shared_data / "masks" / "wsss4luad" / "test" / "img"
    out = []
    for path in sorted(crops.glob("*.png"))[:n]:
        rgb = np.asarray(Image.open(path).convert("RGB"))
        out.append(rgb[:px, :px])
    return np.stack(out)


def test_a_round_trip_leaves_the_stain_and_adds_block_artefacts(shared_data: Path) -> None:
    """Every crop comes back changed by a few grey levels (what a slide scanner's JPEG does: a
    quality-90 mosaic of these crops differs by about 6 levels per channel), its colour kept."""
    from fprotoseg.model.training.compression import jpeg_roundtrip

    batch = _real_crops(shared_data)
    out = jpeg_roundtrip(batch, np.random.default_rng(0), 1.0, (60, 95))
    diff = np.abs(out.astype(np.int16) - batch.astype(np.int16))
    per_crop = diff.reshape(len(batch), -1).mean(1)
    assert out.dtype == np.uint8 and out.shape == batch.shape
    assert (per_crop > 1.0).all() and (per_crop < 15.0).all()
    mean_shift = np.abs(out.reshape(len(batch), -1, 3).mean(1) - batch.reshape(len(batch), -1, 3).mean(1))
    assert mean_shift.max() < 3.0  # the stain's colour is kept: only detail changes
    lower = jpeg_roundtrip(batch, np.random.default_rng(0), 1.0, (20, 20))
    assert np.abs(lower.astype(np.int16) - batch).mean() > diff.mean()  # lower quality, larger change


def test_no_round_trip_draws_nothing_and_half_changes_about_half(shared_data: Path) -> None:
    """prob 0 leaves the batch and the generator as they were, so recipes without it train exactly
    as before; prob 0.5 changes about half the crops."""
    from fprotoseg.model.training.compression import jpeg_roundtrip

    batch = _real_crops(shared_data, n=40, px=64)
    rng = np.random.default_rng(5)
    assert jpeg_roundtrip(batch, rng, 0.0) is batch
    assert rng.random() == np.random.default_rng(5).random()
    out = jpeg_roundtrip(batch, np.random.default_rng(1), 0.5)
    changed = (out != batch).reshape(len(batch), -1).any(1)
    assert 10 <= changed.sum() <= 30
    with pytest.raises(ValueError, match="quality"):
        jpeg_roundtrip(batch, rng, 1.0, (0, 95))


def test_one_quality_round_trip_is_what_a_scanner_at_that_quality_stores(shared_data: Path) -> None:
    """``jpeg_at_quality`` (slide_gap's ``crops_jpegQ`` readings): the size kept, quality 70
    (Aperio's default) changing a real crop more than quality 90 (the mosaic's), 100 least."""
    from fprotoseg.model.training.compression import jpeg_at_quality

    rgb = _real_crops(shared_data, n=1, px=224)[0]
    change = {}
    for quality in (100, 90, 70):
        out = jpeg_at_quality(rgb, quality)
        assert out.shape == rgb.shape and out.dtype == np.uint8
        change[quality] = float(np.abs(out.astype(np.int16) - rgb).mean())
    assert 0 < change[100] < change[90] < change[70] < 15.0
    with pytest.raises(ValueError, match="quality"):
        jpeg_at_quality(rgb, 101)
