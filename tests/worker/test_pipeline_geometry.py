"""Geometry is proven right: slides with known regions, written at several µm/px and pyramid depths,
segmented by the deterministic channel stub, rasterised back and compared with the truth.

A swapped x/y, a level-downsample error or a half-tile shift each drops the IoU far below 0.95.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from fprotoseg.worker.wsi.pipeline import PipelineOptions, run
from tests.stubs import ChannelStubSegmenter, render_known_slide_rgb, render_truth, write_pyramid_tiff
from tests.worker.geometry import iou, qupath_rule_violations, rasterize_features

GRID_MPP = 2.0

CASES = [
    # (slide mpp, pyramid levels, OME-TIFF (tiffslide) or generic TIFF (OpenSlide), model mpp)
    pytest.param(0.25, 4, False, 1.0, id="0.25um-4levels-openslide"),
    pytest.param(0.5, 1, False, 1.0, id="0.5um-1level-openslide"),
    pytest.param(0.499, 3, True, 1.0, id="0.499um-3levels-ome-tiffslide"),
    pytest.param(1.0, 2, False, 1.0, id="1.0um-2levels-openslide"),
    pytest.param(0.5, 2, False, 2.0, id="0.5um-2levels-model2um"),
]


@pytest.fixture(scope="module")
def patches(shared_data: Path) -> Path:
    return shared_data / "patches"


def _segment_known_slide(tmp_path: Path, patches: Path, mpp: float, levels: int, ome: bool, model_mpp: float):
    rgb, _ = render_known_slide_rgb(patches, mpp)
    name = "known.ome.tif" if ome else "known.tiff"
    slide_path = write_pyramid_tiff(tmp_path / name, rgb, mpp, levels, ome=ome)
    del rgb
    stub = ChannelStubSegmenter(mpp=model_mpp)
    result = run(slide_path, tmp_path / "out", stub, options=PipelineOptions(batch_size=8))
    return slide_path, stub, result


@pytest.mark.parametrize(("mpp", "levels", "ome", "model_mpp"), CASES)
def test_polygons_match_known_regions(tmp_path, patches, mpp, levels, ome, model_mpp):
    _, stub, result = _segment_known_slide(tmp_path, patches, mpp, levels, ome, model_mpp)
    prov = result.provenance
    assert prov["slide"]["reader"] == ("tiffslide" if ome else "openslide")
    # The level read is the coarsest one at least as fine as the model: never level 0 when a
    # coarser level serves.
    level_mpps = prov["slide"]["level_mpp"]
    expected_level = max(i for i, m in enumerate(level_mpps) if m <= model_mpp * 1.001)
    assert prov["read"]["level"] == expected_level

    collection = json.loads((result.out_dir / "segmentation.geojson").read_text())
    width, height = prov["slide"]["width_px"], prov["slide"]["height_px"]
    assert qupath_rule_violations(collection, width, height) == []

    truth = render_truth(GRID_MPP)
    names = [c.name for c in stub.classes]
    got = rasterize_features(
        collection["features"], names, slide_mpp=mpp, grid_mpp=GRID_MPP, shape=truth.shape
    )
    for k, name in enumerate(names):
        score = iou(got == k + 1, truth == k + 1)
        assert score > 0.95, f"{name}: IoU {score:.3f} with the known region"
    # Glass stays glass.
    assert iou(got > 0, truth > 0) > 0.95


def test_stats_agree_with_label_map_and_polygons(tmp_path, patches):
    _, stub, result = _segment_known_slide(tmp_path, patches, 0.5, 3, False, 1.0)
    stats = result.stats
    output_mpp = stats["output_mpp"]
    # mask.tiff is the label map: a tiled pyramid with resolution tags.
    with tifffile.TiffFile(result.files["mask"]) as tif:
        page = tif.pages[0]
        assert page.is_tiled
        labels = page.asarray()
        # reduced levels in SubIFDs, each half the size of the one above
        sub_shapes = [p.shape for p in page.pages]
        assert sub_shapes and sub_shapes[0] == ((labels.shape[0] + 1) // 2, (labels.shape[1] + 1) // 2)
        x_res = page.tags["XResolution"].value
        assert page.tags["ResolutionUnit"].value == 3  # centimetre
        assert x_res[0] / x_res[1] == pytest.approx(1e4 / output_mpp)
    assert labels.shape == tuple(result.provenance["output"]["label_map_shape"])
    counts = np.bincount(labels.ravel(), minlength=len(stub.classes) + 1)

    collection = json.loads((result.out_dir / "segmentation.geojson").read_text())
    poly_area = {c.name: 0.0 for c in stub.classes}
    region_count = {c.name: 0 for c in stub.classes}
    for feat in collection["features"]:
        name = feat["properties"]["classification"]["name"]
        poly_area[name] += feat["properties"]["measurements"]["area_um2"]
        region_count[name] += 1

    fractions = 0.0
    for k, entry in enumerate(stats["classes"]):
        assert entry["area_um2"] == counts[k + 1] * output_mpp**2  # exact
        assert entry["area_um2"] > 0
        assert poly_area[entry["name"]] == pytest.approx(entry["area_um2"], rel=0.01)
        assert entry["region_count"] == region_count[entry["name"]]
        fractions += entry["fraction_of_tissue"]
    assert fractions == pytest.approx(1.0, abs=1e-9)
    assert stats["tissue_area_um2"] == counts[1:].sum() * output_mpp**2
    # The slide block names the metadata the areas rest on.
    assert stats["slide"]["mpp"] == pytest.approx(0.5)
    # The known slide's classes are channel permutations of H&E (green/brown tissue): slide QC says
    # so (not_brightfield_he), and nothing else is wrong with it.
    assert [w for w in stats["warnings"] if not w.startswith("not_brightfield_he")] == []
