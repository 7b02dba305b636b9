"""A region of interest on a real slide (CMU-1-Small-Region): only the tiles touching it are read and
inferred, the label map and polygons are cut to it, the areas are the tissue within it, and it is
recorded; malformed, self-intersecting, empty and off-slide ROIs are refused with ``invalid_roi``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import tifffile

from fprotoseg.worker.errors import RoiError
from fprotoseg.worker.wsi.pipeline import PipelineOptions, run
from fprotoseg.worker.wsi.roi import RoiGeometry, parse_roi
from tests.stubs import ChannelStubSegmenter

SLIDE = "slides/CMU-1-Small-Region.svs"
WIDTH_PX, HEIGHT_PX = 2220, 2967  # level 0 of CMU-1-Small-Region


def left_half_roi() -> dict[str, Any]:
    """The left half of the slide as QuPath exports one annotation: a FeatureCollection of one Feature."""
    w = WIDTH_PX / 2
    ring = [[0, 0], [w, 0], [w, HEIGHT_PX], [0, HEIGHT_PX], [0, 0]]
    return {
        "type": "FeatureCollection",
        "features": [
            {
                "type": "Feature",
                "id": "6d1c7f0e-roi",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "annotation", "classification": {"name": "Region*"}},
            }
        ],
    }


@pytest.fixture(scope="module")
def full_and_half(tmp_path_factory: pytest.TempPathFactory, shared_data: Path):
    slide = shared_data / SLIDE
    options = PipelineOptions(batch_size=8, write_overlay=False)
    full_stub, half_stub = ChannelStubSegmenter(), ChannelStubSegmenter()
    full = run(slide, tmp_path_factory.mktemp("full"), full_stub, options=options)
    half = run(slide, tmp_path_factory.mktemp("half"), half_stub, options=options,
               roi=parse_roi(left_half_roi()))
    return full, half, full_stub, half_stub


def test_half_roi_gives_half_the_tissue_from_fewer_tiles(full_and_half):
    full, half, full_stub, half_stub = full_and_half
    full_tissue, half_tissue = full.stats["tissue_area_um2"], half.stats["tissue_area_um2"]
    ratio = half_tissue / full_tissue
    print(f"tissue: whole slide {full_tissue / 1e6:.4f} mm², left half {half_tissue / 1e6:.4f} mm² "
          f"({ratio:.3f}); tiles {full.tiles_inferred} -> {half.tiles_inferred}")
    # The tissue the whole-slide run found in that half (its label map, cut at the same column):
    # the left half of the slide holds 37% of its tissue (0.226 of 0.614 mm²), not half; the ROI
    # run must find that same tissue, to 2.5%: slide QC is judged within the ROI (the focus
    # reference is the ROI's own sharp tissue), so its excluded blocks differ a little (1.8% here).
    full_labels = tifffile.imread(full.files["mask"], level=0)
    cut = round(WIDTH_PX / 2 * full.stats["slide"]["mpp"] / full.stats["output_mpp"])
    px_area = full.stats["output_mpp"] ** 2
    assert half_tissue == pytest.approx((full_labels[:, :cut] > 0).sum() * px_area, rel=0.025)
    assert 0.25 < ratio < 0.75
    # fewer tiles read and inferred: the network saw only the ROI's tiles
    assert sum(half_stub.calls) == half.tiles_inferred < 0.7 * full.tiles_inferred
    assert sum(full_stub.calls) == full.tiles_inferred
    # fractions are within the ROI, and they add up
    assert sum(c["fraction_of_tissue"] for c in half.stats["classes"]) == pytest.approx(1.0)
    assert half.stats["roi"]["area_um2"] == pytest.approx(
        WIDTH_PX / 2 * HEIGHT_PX * half.stats["slide"]["mpp"] ** 2
    )


def test_outputs_are_cut_to_the_roi_and_it_is_recorded(full_and_half):
    from shapely.geometry import box, shape

    _, half, _, _ = full_and_half
    labels = tifffile.imread(half.files["mask"], level=0)
    cut = round(WIDTH_PX / 2 * half.stats["slide"]["mpp"] / half.stats["output_mpp"])
    assert labels[:, cut:].max() == 0 and labels[:, :cut].any()
    roi = box(0, 0, WIDTH_PX / 2, HEIGHT_PX)
    collection = json.loads(half.files["geojson"].read_text())
    assert collection["features"]
    for feature in collection["features"]:
        assert roi.buffer(1e-6).contains(shape(feature["geometry"]))
    prov = json.loads(half.files["provenance"].read_text())
    assert prov["roi"]["geometry"]["type"] == "MultiPolygon"
    assert prov["roi"]["bounds_px"] == [0.0, 0.0, WIDTH_PX / 2, HEIGHT_PX]
    assert prov["roi"]["coordinates"] == "level-0 pixels"


def test_roi_with_a_hole_and_partly_off_the_slide_is_clipped():
    outer = [[-500, -500], [1000, -500], [1000, 1000], [-500, 1000], [-500, -500]]
    hole = [[200, 200], [400, 200], [400, 400], [200, 400], [200, 200]]
    roi = parse_roi({"type": "Polygon", "coordinates": [outer, hole]})
    geom = RoiGeometry.on_slide(roi, WIDTH_PX, HEIGHT_PX)
    assert geom.geometry.area == pytest.approx(1000 * 1000 - 200 * 200)
    raster = geom.raster((1100, 1100), 1.0)
    assert raster[100, 100] and not raster[300, 300] and not raster[1050, 1050]
    assert raster.sum() == pytest.approx(1000 * 1000 - 200 * 200, rel=0.005)


BOW_TIE = {"type": "Polygon", "coordinates": [[[0, 0], [600, 500], [600, 0], [0, 300], [0, 0]]]}


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        ("{not json", "not JSON"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 0.5]]]}, "closed"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [0, 0]]]}, "at least 4"),
        ({"type": "Point", "coordinates": [5, 5]}, "no area"),
        ({"type": "FeatureCollection", "features": []}, "no polygon"),
        ({"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [20, 20], [0, 0]]]}, "no area"),
        ({"type": "Polygon", "coordinates": [[[0, 0], ["a", 0], [1, 1], [0, 0]]]}, "finite numbers"),
    ],
)
def test_malformed_rois_are_refused_with_one_line(doc, says):
    with pytest.raises(RoiError) as caught:
        parse_roi(doc if isinstance(doc, str) else json.dumps(doc))
    assert caught.value.code == "invalid_roi" and says in caught.value.message
    assert "\n" not in caught.value.message


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        (BOW_TIE, "not valid (Self-intersection"),
        ({"type": "Polygon", "coordinates": [[[3000, 0], [4000, 0], [4000, 50], [3000, 0]]]},
         "outside the slide"),
    ],
)
def test_geometry_the_api_cannot_see_is_refused_before_a_tile_is_read(tmp_path, shared_data, doc, says):
    stub = ChannelStubSegmenter()
    with pytest.raises(RoiError) as caught:
        run(shared_data / SLIDE, tmp_path / "out", stub, roi=parse_roi(doc))
    assert says in caught.value.message
    assert stub.calls == [] and not (tmp_path / "out").exists()
