"""The pipeline's behaviour around the geometry: empty tissue, progress, cancellation, a real
network through the Segmenter seam, optional outputs, and tiles only where tissue is.
"""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from PIL import Image

from fprotoseg.worker.errors import JobCancelledError
from fprotoseg.worker.wsi.pipeline import STAGES, PipelineOptions, run
from tests.stubs import ChannelStubSegmenter, write_pyramid_tiff


def test_blank_slide_succeeds_with_zero_areas_and_says_so(tmp_path):
    rng = np.random.default_rng(0)
    glass = np.clip(240 + rng.integers(-4, 5, size=(900, 1100, 1)), 0, 255).astype(np.uint8).repeat(3, 2)
    path = write_pyramid_tiff(tmp_path / "blank.tiff", glass, 0.5, 2)
    stub = ChannelStubSegmenter()
    result = run(path, tmp_path / "out", stub)
    assert stub.calls == []  # glass never reaches the network
    assert result.stats["tissue_area_um2"] == 0
    assert all(c["area_um2"] == 0 and c["fraction_of_tissue"] == 0 for c in result.stats["classes"])
    assert result.stats["warnings"] and "no tissue" in result.stats["warnings"][0]
    collection = json.loads((tmp_path / "out" / "segmentation.geojson").read_text())
    assert collection == {"type": "FeatureCollection", "features": []}
    for name in ("stats.json", "mask.tiff", "overlay.png", "provenance.json"):
        assert (tmp_path / "out" / name).is_file()


def test_progress_reports_every_stage_in_order(tmp_path, known_slide):
    events: list[tuple[str, int, int]] = []
    result = run(known_slide.path, tmp_path / "out", ChannelStubSegmenter(),
                 progress=lambda s, d, t: events.append((s, d, t)))
    seen = list(dict.fromkeys(e[0] for e in events))
    assert seen == list(STAGES)
    inference = [e for e in events if e[0] == "inference"]
    assert inference[-1][1] == inference[-1][2] == result.provenance["tiles"]["inferred"]
    assert all(d <= t for _, d, t in events)


def test_only_tissue_tiles_are_inferred(tmp_path, known_slide):
    stub = ChannelStubSegmenter()
    result = run(known_slide.path, tmp_path / "out", stub, options=PipelineOptions(batch_size=4))
    tiles = result.provenance["tiles"]
    assert sum(stub.calls) == tiles["inferred"]
    assert 0 < tiles["inferred"] < tiles["grid_total"]
    assert tiles["skipped_no_tissue"] == tiles["grid_total"] - tiles["inferred"]


def test_cancel_between_batches(tmp_path, known_slide):
    stub = ChannelStubSegmenter()
    with pytest.raises(JobCancelledError):
        run(known_slide.path, tmp_path / "out", stub, options=PipelineOptions(batch_size=2),
            should_cancel=lambda: len(stub.calls) >= 2)
    assert len(stub.calls) == 2
    assert not (tmp_path / "out" / "stats.json").exists()


def test_real_network_through_the_seam_and_optional_outputs(tmp_path, known_slide, tiny_checkpoint):
    from fprotoseg import model

    segmenter = model.load_segmenter(tiny_checkpoint, device="cpu", precision="fp32")
    opts = PipelineOptions(batch_size=8, geojson_gzip=True, output_mpp=4.0)
    result = run(known_slide.path, tmp_path / "out", segmenter, options=opts)
    assert set(result.files) == {
        "geojson", "geojson_gz", "stats", "mask", "overlay", "provenance", "qc", "artefacts", "confidence"
    }
    plain = (tmp_path / "out" / "segmentation.geojson").read_bytes()
    assert gzip.decompress(result.files["geojson_gz"].read_bytes()) == plain
    prov = result.provenance
    assert prov["model"]["name"] == segmenter.name
    assert prov["model"]["checksum_sha256"] == segmenter.checksum_sha256
    assert prov["output"]["mpp"] == 4.0
    assert result.stats["tissue_area_um2"] > 0
    # the overlay is the thumbnail plus a legend panel on the right
    overlay = Image.open(result.files["overlay"])
    assert overlay.mode == "RGB" and overlay.width > overlay.height * 1.1


def test_bf16_autocast_runs_on_cpu(tmp_path, known_slide, tiny_checkpoint):
    from fprotoseg import model

    segmenter = model.load_segmenter(tiny_checkpoint, device="cpu", precision="bf16")
    result = run(known_slide.path, tmp_path / "out", segmenter, options=PipelineOptions(batch_size=8))
    assert result.provenance["model"]["precision"] == "bf16"
    assert result.stats["tissue_area_um2"] > 0
