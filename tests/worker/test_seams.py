"""No class border may follow a tile edge: the packaged network on a slide the test writes.

The slide is two real textures (normal lung above a diagonal, tumour below) laid out with the
border crossing tiles diagonally. Three checks: the pipeline's label map equals one pass of the
network over the whole slide (tiles, overlaps and stitching add nothing), the predicted border runs
along the drawn diagonal (slope and offset), and class changes on the tile grid's seams are no more
frequent than in that untiled pass on the same lines. A tile-level verdict (a network that paints
each tile with its mean score) is run through the same detector to show it would fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from fprotoseg.worker.wsi.pipeline import PipelineOptions, receptive_field_px, run
from fprotoseg.worker.wsi.tiling import default_margin_px
from tests.stubs import write_pyramid_tiff

SIDE_PX = 1152  # at 1.0 µm/px: three tile steps of the packaged network each way
OUTPUT_MPP = 2.0
# No absorption of small regions: the one-pass reference has none, and the comparison is of tiling.
OPTIONS = dict(output_mpp=OUTPUT_MPP, min_region_area_um2=0.0)


def _texture(rgb: np.ndarray, side: int) -> np.ndarray:
    """Fill a side x side square by mirroring a real crop (no synthetic pixels)."""
    reps_y, reps_x = -(-side // rgb.shape[0]), -(-side // rgb.shape[1])
    rows = [
        np.concatenate([rgb[:, ::-1] if j % 2 else rgb for j in range(reps_x)], axis=1) for _ in range(reps_y)
    ]
    return np.concatenate([r[::-1] if i % 2 else r for i, r in enumerate(rows)], axis=0)[:side, :side]


@pytest.fixture(scope="module")
def diagonal_slide(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    crops = shared_data / "masks" / "wsss4luad" / "test" / "img"
    with Image.open(crops / "68.png") as im:
        whole = np.asarray(im.convert("RGB"))
    normal, tumour = whole[0:380], whole[1280:1710]  # the normal band and the tumour band of 68.png
    a, b = _texture(normal, SIDE_PX), _texture(tumour, SIDE_PX)
    yy, xx = np.mgrid[0:SIDE_PX, 0:SIDE_PX]
    rgb = np.where((yy < 0.8 * xx + 150)[..., None], a, b).astype(np.uint8)
    return write_pyramid_tiff(tmp_path_factory.mktemp("seam") / "diagonal.tiff", rgb, 1.0, 2, quality=95)


def _slide_pixels(path: Path) -> np.ndarray:
    """Level 0 as the slide stores it (after JPEG), the pixels the pipeline reads."""
    with tifffile.TiffFile(path) as tif:
        return tif.pages[0].asarray()


def _labels(out_dir: Path) -> np.ndarray:
    with tifffile.TiffFile(out_dir / "mask.tiff") as tif:
        return tif.pages[0].asarray()


def _seam_ratio(labels: np.ndarray, seams_px: list[int]) -> float:
    """Class changes across the seam lines per pixel pair, over class changes across every line
    (1 = a seam is like anywhere else; a tile-level verdict makes it many times higher)."""
    tissue = labels > 0
    horiz = (labels[:, 1:] != labels[:, :-1]) & tissue[:, 1:] & tissue[:, :-1]
    vert = (labels[1:] != labels[:-1]) & tissue[1:] & tissue[:-1]
    everywhere = (horiz.mean() + vert.mean()) / 2
    at_seams = np.mean([horiz[:, s - 1].mean() for s in seams_px] + [vert[s - 1].mean() for s in seams_px])
    return float(at_seams / max(everywhere, 1e-9))


class TileVerdict:
    """A network with a tile-level gate: every pixel of a tile gets the tile's mean scores."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        for name in (
            "name",
            "checksum_sha256",
            "classes",
            "mpp",
            "tile_size_px",
            "output_stride",
            "device",
            "precision",
            "manifest",
            "receptive_field_px",
            "network_stride_px",
        ):
            setattr(self, name, getattr(inner, name))

    def predict(self, tiles: np.ndarray) -> np.ndarray:
        scores = self.inner.predict(tiles)
        return np.broadcast_to(scores.mean(axis=(2, 3), keepdims=True), scores.shape).copy()


def _border_rows(labels: np.ndarray, above: int) -> np.ndarray:
    """Per output column, the row that best splits the class found above the drawn diagonal from the
    other tissue classes below it (background holes in the texture count for neither side)."""
    is_above = (labels == above).astype(np.int64)
    other = ((labels > 0) & (labels != above)).astype(np.int64)
    zero = np.zeros((1, labels.shape[1]), np.int64)
    above_before = np.vstack([zero, np.cumsum(is_above, axis=0)])
    other_before = np.vstack([zero, np.cumsum(other, axis=0)])
    return (above_before + (other_before[-1] - other_before)).argmax(axis=0)


# The packaged default ships with a guided refinement on 1024 px tiles; the test runs it on 512 px
# tiles so the 1152 px slide crosses many tiles (the refinement's margin leaves a 128 px step).
VARIANTS: dict[str, dict[str, Any] | None] = {
    "network-cells": None,  # the refinement removed: the network's 8 px cells alone
    "shipped": {},  # the manifest's own refinement
    "stride-4": {"output_stride": 4, "radius_cells": 8, "eps": 0.01},  # finer than the network
}


def _packaged_with(tmp_path: Path, variant: str) -> Path:
    """A copy of the packaged default on 512 px tiles, with the refinement of ``variant``."""
    from fprotoseg.model import DEFAULT_CHECKPOINT
    from fprotoseg.model.checkpoint import read_checkpoint, save_checkpoint

    state, manifest = read_checkpoint(DEFAULT_CHECKPOINT)
    inference = dict(manifest.get("inference") or {})
    refine = VARIANTS[variant]
    if refine is None:
        inference.pop("guided_refine", None)
    elif refine:
        inference["guided_refine"] = refine
    manifest["inference"], manifest["tile_size_px"] = inference, 512
    out = tmp_path / f"{variant}.safetensors"
    save_checkpoint(out, state, manifest)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_no_class_border_follows_a_tile_edge(tmp_path: Path, diagonal_slide: Path, variant: str) -> None:
    """With the guided refinement too: its filter support is part of the receptive field the tile
    margin covers, so the tiled result still equals one pass over the whole slide."""
    from fprotoseg.model import load_segmenter
    from fprotoseg.worker.wsi.stitch import sample_bilinear

    seg = load_segmenter(_packaged_with(tmp_path, variant), device="cpu")
    refine = seg.manifest["inference"].get("guided_refine")
    assert (refine is None) == (variant == "network-cells")
    assert seg.output_stride == (refine or {"output_stride": 8})["output_stride"]
    result = run(diagonal_slide, tmp_path / "tiles", seg, options=PipelineOptions(**OPTIONS))
    labels = _labels(tmp_path / "tiles")
    margin = default_margin_px(
        seg.tile_size_px, seg.output_stride, receptive_field_px(seg), seg.network_stride_px
    )
    assert result.provenance["tiles"]["inferred"] > 4  # the border crosses several tiles
    step_out = (seg.tile_size_px - 2 * margin) * seg.mpp / OUTPUT_MPP
    seams = [
        round(k * step_out)
        for k in range(1, int(labels.shape[0] / step_out) + 1)
        if k * step_out < labels.shape[0]
    ]
    assert seams

    # One pass over the whole slide, sampled at the output pixels' centres like the stitcher.
    whole = _slide_pixels(diagonal_slide)
    scores = seg.predict(whole[None])[0]
    centres = (np.arange(labels.shape[0]) + 0.5) * OUTPUT_MPP / seg.mpp / seg.output_stride - 0.5
    reference = sample_bilinear(scores, centres, centres).argmax(0) + 1
    tissue = labels > 0
    agreement = float((labels[tissue] == reference[tissue]).mean())
    assert agreement > 0.98, agreement
    # Away from the slide's edge (where the single pass pads with zeros and the pipeline reflects
    # real pixels: one receptive field wide) the tiled result is the single pass.
    band = int(np.ceil(receptive_field_px(seg) * seg.mpp / OUTPUT_MPP / 2))
    inner = np.zeros_like(tissue)
    inner[band:-band, band:-band] = True
    inner &= tissue
    inner_agreement = float((labels[inner] == reference[inner]).mean())
    assert inner_agreement > 0.999, inner_agreement

    # Both textures are found, and the border between them runs along the drawn diagonal
    # (y = 0.8 x + 150 at level 0), not along tiles.
    found = np.bincount(labels[tissue].ravel(), minlength=4)[1:] / tissue.sum()
    assert (found > 0.15).sum() >= 2, found
    top_right = labels[: labels.shape[0] // 8, labels.shape[1] - labels.shape[1] // 8 :]
    above = int(np.bincount(top_right.ravel()).argmax())
    rows = _border_rows(labels, above)
    cols = np.arange(labels.shape[1])
    slope = np.polyfit(cols, rows, 1)[0]
    drawn = 0.8 * cols + 150 * 1.0 / OUTPUT_MPP
    off_px = np.abs(rows - drawn)
    assert abs(slope - 0.8) < 0.15, slope
    assert np.median(off_px) * OUTPUT_MPP < 20, np.median(off_px)  # µm

    # Class changes on the seam lines are no more frequent than in one untiled pass on the same
    # lines: what remains there is the texture's own response, not tiling.
    ratio = _seam_ratio(labels, seams)
    reference_ratio = _seam_ratio(np.where(tissue, reference, 0), seams)
    assert ratio <= 1.1 * reference_ratio, (ratio, reference_ratio)

    # The same detector on a tile-level verdict: its borders follow the tiles.
    gated = run(
        diagonal_slide, tmp_path / "gated", TileVerdict(seg), options=PipelineOptions(**OPTIONS)
    )
    assert gated.tiles_inferred == result.tiles_inferred
    assert _seam_ratio(_labels(tmp_path / "gated"), seams) > 3 * max(ratio, 1.0)
