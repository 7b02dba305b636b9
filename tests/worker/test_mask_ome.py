"""mask.tiff is an OME-TIFF: tifffile reads it as one multi-level OME series at the output
resolution, with the label names and colours in its OME-XML, and tiffslide opens it at the same
scale; the label map itself is unchanged (level 0 = the map stats.json counts)."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import tifffile

from fprotoseg.worker.wsi.outputs import LABEL_COLORS_NAMESPACE, LABEL_NAMES_NAMESPACE, OME_NAMESPACE
from fprotoseg.worker.wsi.pipeline import PipelineOptions, run
from tests.stubs import ChannelStubSegmenter


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory, shared_data: Path):
    stub = ChannelStubSegmenter()
    options = PipelineOptions(output_mpp=1.0, write_overlay=False)
    return run(shared_data / "slides/CMU-1-Small-Region.svs", tmp_path_factory.mktemp("ome"), stub,
               options=options), stub


def test_tifffile_reads_a_multilevel_ome_series_at_the_output_scale(result):
    run_result, stub = result
    mpp = run_result.stats["output_mpp"]
    with tifffile.TiffFile(run_result.files["mask"]) as tif:
        assert tif.is_ome and len(tif.series) == 1
        series = tif.series[0]
        assert series.is_pyramidal and len(series.levels) >= 3
        shapes = [level.shape for level in series.levels]
        assert shapes[0] == tuple(run_result.provenance["output"]["label_map_shape"])
        for above, below in itertools.pairwise(shapes):
            assert below == ((above[0] + 1) // 2, (above[1] + 1) // 2)
        labels = series.levels[0].asarray()
        reduced = series.levels[1].asarray()
        assert np.array_equal(reduced, labels[::2, ::2])  # nearest neighbour: labels stay labels
        root = ET.fromstring(tif.ome_metadata)
    ns = {"ome": OME_NAMESPACE}
    pixels = root.find("ome:Image/ome:Pixels", ns)
    assert pixels is not None and pixels.get("Type") == "uint8"
    assert float(pixels.get("PhysicalSizeX")) == float(pixels.get("PhysicalSizeY")) == mpp
    assert pixels.get("PhysicalSizeXUnit") == "µm" and pixels.get("PhysicalSizeYUnit") == "µm"
    maps = {
        m.get("Namespace"): {e.get("K"): e.text for e in m.findall("ome:Value/ome:M", ns)}
        for m in root.findall("ome:StructuredAnnotations/ome:MapAnnotation", ns)
    }
    assert maps[LABEL_NAMES_NAMESPACE] == {"0": "Background", **{
        str(k + 1): c.name for k, c in enumerate(stub.classes)
    }}
    assert maps[LABEL_COLORS_NAMESPACE]["1"] == "#{:02x}{:02x}{:02x}".format(*stub.classes[0].color)
    counts = np.bincount(labels.ravel(), minlength=len(stub.classes) + 1)
    for c in run_result.stats["classes"]:
        assert c["pixel_count"] == counts[c["label"]]


def test_tiffslide_opens_it_at_the_same_scale(result):
    import tiffslide

    run_result, _ = result
    mpp = run_result.stats["output_mpp"]
    with tiffslide.TiffSlide(run_result.files["mask"]) as slide:
        assert slide.level_count >= 3
        h, w = run_result.provenance["output"]["label_map_shape"]
        assert slide.dimensions == (w, h)
        assert slide.level_downsamples[1] == pytest.approx(2.0, rel=0.01)
        assert float(slide.properties["tiffslide.mpp-x"]) == pytest.approx(mpp)
        assert float(slide.properties["tiffslide.mpp-y"]) == pytest.approx(mpp)
