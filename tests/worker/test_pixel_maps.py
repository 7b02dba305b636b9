"""The per-pixel files beside the mask, on real pixels: CMU-1-Small-Region with two marker strokes
drawn on it goes through the pipeline. ``artefacts.tiff`` marks the ink where it was drawn (and the
label map leaves it out), ``confidence.tiff`` is the chosen class's probability, and with
``write_probabilities`` ``probabilities.ome.tiff`` is a multi-level OME series at the output scale,
one channel per class, summing to 255 on tissue, whose argmax is the label map."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile

from fprotoseg.worker.wsi.outputs import OME_NAMESPACE
from fprotoseg.worker.wsi.pipeline import PipelineOptions, run
from fprotoseg.worker.wsi.qc_regions import ARTEFACT_BITS
from fprotoseg.worker.wsi.slide import open_slide
from tests.stubs import ChannelStubSegmenter, draw_ink_strokes, write_pyramid_tiff

OUTPUT_MPP = 2.0
SLIDE_MPP = 0.499


@pytest.fixture(scope="module")
def inked(tmp_path_factory: pytest.TempPathFactory, shared_data: Path):
    """(run result, stroke map at level 0, stub): probabilities asked for, no small-region absorption
    (so the label map is the network's argmax wherever it scores tissue)."""
    folder = tmp_path_factory.mktemp("pixel-maps")
    with open_slide(shared_data / "slides/CMU-1-Small-Region.svs") as slide:
        rgb = slide.read_level(0, 0, 0, slide.width_px, slide.height_px)
    inked_rgb, strokes = draw_ink_strokes(rgb)
    path = write_pyramid_tiff(folder / "inked.tiff", inked_rgb, SLIDE_MPP, 2)
    stub = ChannelStubSegmenter()
    options = PipelineOptions(
        output_mpp=OUTPUT_MPP, write_overlay=False, write_probabilities=True, min_region_area_um2=0.0,
        reader_threads=2,
    )
    return run(path, folder / "out", stub, options=options), strokes, stub


def _ome_pixels(tif: tifffile.TiffFile) -> ET.Element:
    pixels = ET.fromstring(tif.ome_metadata).find("ome:Image/ome:Pixels", {"ome": OME_NAMESPACE})
    assert pixels is not None
    return pixels


def test_probabilities_are_a_multilevel_ome_series_with_one_channel_per_class(inked):
    result, _, stub = inked
    path = result.files["probabilities"]
    assert path.name == "probabilities.ome.tiff"
    labels = tifffile.imread(result.files["mask"], level=0)
    n = len(stub.classes)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and len(tif.series) == 1
        series = tif.series[0]
        assert series.axes == "CYX" and series.is_pyramidal and len(series.levels) >= 3
        shapes = [level.shape for level in series.levels]
        assert shapes[0] == (n, *labels.shape)
        for above, below in itertools.pairwise(shapes):
            assert below == (n, (above[1] + 1) // 2, (above[2] + 1) // 2)
        probs = series.levels[0].asarray()
        assert np.array_equal(series.levels[1].asarray(), probs[:, ::2, ::2])
        pixels = _ome_pixels(tif)
        names = [c.get("Name") for c in pixels.findall("ome:Channel", {"ome": OME_NAMESPACE})]
    assert probs.dtype == np.uint8
    assert float(pixels.get("PhysicalSizeX")) == float(pixels.get("PhysicalSizeY")) == OUTPUT_MPP
    assert pixels.get("PhysicalSizeXUnit") == "µm" and pixels.get("SizeC") == str(n)
    assert names == [c.name for c in stub.classes]

    tissue = labels > 0
    assert tissue.sum() > 10_000
    sums = probs.astype(np.int32).sum(axis=0)
    assert np.abs(sums[tissue] - 255).max() <= n  # each channel rounded on its own
    assert (probs[:, ~tissue] == 0).all()  # glass and QC-excluded pixels are not scored
    top = np.sort(probs, axis=0)
    untied = tissue & (top[-1] > top[-2])  # uint8 rounding can tie two nearly equal classes
    assert untied.sum() > 0.95 * tissue.sum()
    assert np.array_equal(probs.argmax(axis=0)[untied] + 1, labels[untied])
    confidence = tifffile.imread(result.files["confidence"], level=0)
    assert np.array_equal(confidence, probs.max(axis=0))  # the chosen class's probability


def test_artefacts_file_marks_the_drawn_ink_and_the_label_map_leaves_it_out(inked):
    import cv2

    result, strokes, _ = inked
    artefacts = tifffile.imread(result.files["artefacts"], level=0)
    labels = tifffile.imread(result.files["mask"], level=0)
    assert artefacts.shape == labels.shape
    with tifffile.TiffFile(result.files["artefacts"]) as tif:
        assert tif.is_ome and tif.series[0].is_pyramidal
        assert float(_ome_pixels(tif).get("PhysicalSizeX")) == OUTPUT_MPP
        assert "pen_ink" in tif.ome_metadata
    ink = (artefacts & ARTEFACT_BITS["pen_ink"]) != 0
    drawn = cv2.resize(strokes, (labels.shape[1], labels.shape[0]), interpolation=cv2.INTER_AREA) > 0
    core = cv2.erode(drawn.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0  # off the anti-aliased rims
    assert ink[core].mean() > 0.9  # the strokes are marked ...
    assert (ink & ~drawn).sum() < 0.05 * ink.sum()  # ... where they were drawn, not elsewhere
    assert (labels[ink] == 0).all()  # and not scored
    qc = result.stats["qc"]
    assert "pen_ink" in qc["artefact_area_um2"] and qc["artefact_area_um2"]["pen_ink"] > 0
    assert qc["excluded_area_um2"] > 0


def test_no_probabilities_unless_asked(tmp_path, shared_data):
    result = run(
        shared_data / "slides/CMU-1-Small-Region.svs", tmp_path, ChannelStubSegmenter(),
        options=PipelineOptions(output_mpp=8.0, write_overlay=False, reader_threads=2),
    )
    assert "probabilities" not in result.files and not list(tmp_path.glob("*probabilities*"))
    assert result.files["artefacts"].is_file() and result.files["confidence"].is_file()
    assert not list(tmp_path.glob(".probabilities-*"))  # the disk-backed planes leave nothing
