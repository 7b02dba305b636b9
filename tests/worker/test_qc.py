"""Slide QC on real pixels: what is not brightfield H&E is flagged (and refused under ``refuse``),
no real H&E slide raises a false alarm, and blur and pen ink drawn onto a real slide are found
where they were put, with their area."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.errors import QcRefusedError
from fprotoseg.worker.wsi import qc
from fprotoseg.worker.wsi.pipeline import PipelineOptions, _tissue_stage, run
from fprotoseg.worker.wsi.qc_regions import ARTEFACT_BITS
from fprotoseg.worker.wsi.slide import open_slide
from tests.stubs import ChannelStubSegmenter, write_pyramid_tiff

DAPI = "slides/test3-DAPI-2-387.ndpi"
CMU = "slides/CMU-1-Small-Region.svs"
# every H&E slide of the shared data, with the pixel size the one without metadata needs
HE_SLIDES = (
    (CMU, None),
    ("slides/derived/CMU-1-Small-Region.pyramid.tiff", None),
    ("slides/OS-1-detail.ome.tif", None),
    ("slides/TCGA-CR-7395-01A-01-TS1.svs", 0.5),
)


def _qc(path: Path, *, policy: str = "warn", mpp: float | None = None) -> qc.QcReport:
    """The QC stage alone, on the tissue mask and thumbnail the pipeline gives it."""
    options = PipelineOptions(reader_threads=2)
    with open_slide(path, mpp_override=mpp) as slide:
        tissue, thumbnail = _tissue_stage(slide, options)
        return qc.run_qc(
            slide, tissue, thumbnail, ChannelStubSegmenter(), policy=policy, qc_mpp=options.output_mpp,
            threads=2,
        )


def _cmu_rgb(shared_data: Path) -> np.ndarray:
    with open_slide(shared_data / CMU) as slide:
        return slide.read_level(0, 0, 0, slide.width_px, slide.height_px)


def test_dapi_fluorescence_is_flagged_and_refused_before_inference(tmp_path, shared_data):
    stub = ChannelStubSegmenter()
    with pytest.raises(QcRefusedError) as refused:
        run(shared_data / DAPI, tmp_path / "refused", stub, options=PipelineOptions(qc_policy="refuse"))
    assert refused.value.code == ErrorCode.NOT_BRIGHTFIELD_HE
    assert refused.value.exit_code == ErrorCode.NOT_BRIGHTFIELD_HE.exit_code
    assert stub.calls == []  # no tile reached the network

    result = run(shared_data / DAPI, tmp_path / "warned", stub)  # warn: the default
    assert any(w.startswith("not_brightfield_he:") for w in result.stats["warnings"])
    assert result.stats["qc"]["verdict"] == "warn" and result.stats["qc"]["codes"] == ["not_brightfield_he"]
    report = json.loads((tmp_path / "warned" / "qc.json").read_text())
    check = report["checks"]["brightfield_he"]
    assert check["values"]["kind"] == "fluorescence"
    assert check["values"]["dark_fraction"] > check["thresholds"]["fluorescence_min_dark_fraction"]


@pytest.mark.parametrize(("rel", "mpp"), HE_SLIDES)
def test_every_he_slide_passes_the_brightfield_check(shared_data, rel, mpp):
    report = _qc(shared_data / rel, mpp=mpp)
    (bright,) = [c for c in report.checks if c.name == "brightfield_he"]
    assert bright.passed is True and bright.values["kind"] == "brightfield_he", bright.values
    assert report.scan is not None and report.scan.tissue_px > 0
    # no artefact alarm on real slides as scanned
    assert report.scan.area_um2["pen_ink"] == 0.0
    assert report.scan.area_um2["any"] < 0.05 * report.scan.tissue_px * report.scan.mpp**2


def test_ihc_image_is_flagged_as_not_he(tmp_path, shared_data):
    from PIL import Image

    rgb = np.asarray(Image.open(shared_data / "patches/unlabelled/skimage-ihc.png").convert("RGB"))
    path = write_pyramid_tiff(tmp_path / "ihc.tiff", np.ascontiguousarray(rgb), 0.5, 1)
    report = _qc(path)
    (bright,) = [c for c in report.checks if c.name == "brightfield_he"]
    assert bright.passed is False and bright.values["kind"] == "ihc_dab"
    assert bright.values["dab_fraction"] > bright.thresholds["ihc_min_dab_fraction"]
    with pytest.raises(QcRefusedError) as refused:
        _qc(path, policy="refuse")
    assert refused.value.code == ErrorCode.NOT_BRIGHTFIELD_HE


def test_blurred_half_is_reported_out_of_focus_with_its_area(tmp_path, shared_data):
    import cv2

    rgb = _cmu_rgb(shared_data)
    half_px = rgb.shape[1] // 2
    # 4 px at 0.499 µm/px: a 2 µm blur, a slide region scanned out of focus
    rgb[:, half_px:] = cv2.GaussianBlur(np.ascontiguousarray(rgb[:, half_px:]), (0, 0), 4.0)
    path = write_pyramid_tiff(tmp_path / "blurred.tiff", rgb, 0.499, 2)
    report = _qc(path)
    scan = report.scan
    assert scan is not None
    options = PipelineOptions()
    with open_slide(path) as slide:
        tissue, _ = _tissue_stage(slide, options)
    # the tissue of each half, at the QC resolution, from the pipeline's own tissue mask
    h, w = scan.artefacts.shape
    rows = np.minimum(((np.arange(h) + 0.5) * scan.mpp / tissue.mpp).astype(int), tissue.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * scan.mpp / tissue.mpp).astype(int), tissue.shape[1] - 1)
    tissue_qc = tissue.mask[np.ix_(rows, cols)]
    split = round(half_px * 0.499 / scan.mpp)
    blurred = (scan.artefacts & ARTEFACT_BITS["out_of_focus"]) != 0
    px_um2 = scan.mpp**2
    right_tissue_um2 = tissue_qc[:, split:].sum() * px_um2
    right_flagged_um2 = blurred[:, split:].sum() * px_um2
    left_flagged_um2 = blurred[:, :split].sum() * px_um2
    assert right_flagged_um2 == pytest.approx(right_tissue_um2, rel=0.15)
    assert left_flagged_um2 < 0.05 * tissue_qc[:, :split].sum() * px_um2
    assert report.scan.area_um2["out_of_focus"] == pytest.approx(right_tissue_um2, rel=0.15)

    # the blurred half is left out of the class areas and the polygons
    result = run(path, tmp_path / "out", ChannelStubSegmenter(), options=PipelineOptions(batch_size=8))
    stats = result.stats
    assert stats["qc"]["excluded_area_um2"] == pytest.approx(right_tissue_um2, rel=0.2)
    assert sum(c["area_um2"] for c in stats["classes"]) == pytest.approx(stats["tissue_area_um2"])
    assert stats["tissue_area_um2"] < 0.7 * scan.tissue_px * px_um2
    collection = json.loads((tmp_path / "out" / "segmentation.geojson").read_text())
    right_edge_px = half_px + 200  # polygons may reach a little past the blur edge (block size)
    right_polygons_um2 = sum(
        f["properties"]["measurements"]["area_um2"]
        for f in collection["features"]
        if f["geometry"]["type"] == "Polygon"
        and min(x for x, _ in f["geometry"]["coordinates"][0]) > right_edge_px
    )
    assert right_polygons_um2 < 0.1 * right_tissue_um2


def test_pen_ink_drawn_on_a_real_slide_is_found(tmp_path, shared_data):
    import cv2

    rgb = _cmu_rgb(shared_data)
    strokes = np.zeros(rgb.shape[:2], dtype=np.uint8)
    # marker strokes 150 µm wide across tissue and glass: a green and a blue one
    cv2.polylines(strokes, [np.array([[200, 300], [900, 700], [1700, 600]], np.int32)], False, 1, 300)
    cv2.polylines(strokes, [np.array([[300, 2200], [1200, 2500], [2000, 2100]], np.int32)], False, 2, 300)
    out = rgb.astype(np.float32)
    for value, ink_rgb in ((1, (40, 160, 70)), (2, (30, 70, 190))):
        # ink is a filter over the tissue: transmitted light = tissue x ink transmittance
        out[strokes == value] *= np.array(ink_rgb, np.float32) / 255.0
    path = write_pyramid_tiff(tmp_path / "ink.tiff", out.astype(np.uint8), 0.499, 2)

    report = _qc(path)
    assert report.scan is not None
    drawn_um2 = float((strokes > 0).sum()) * 0.499**2
    found_um2 = report.scan.area_um2["pen_ink"]
    # the strokes' area, on tissue and glass alike (minus their faint anti-aliased rims)
    assert 0.5 * drawn_um2 < found_um2 < 1.15 * drawn_um2
    ink = (report.scan.artefacts & ARTEFACT_BITS["pen_ink"]) != 0
    small = cv2.resize(strokes, (ink.shape[1], ink.shape[0]), interpolation=cv2.INTER_NEAREST) > 0
    assert (ink & ~small).sum() < 0.05 * ink.sum()  # where it was drawn, not elsewhere


def test_models_list_shows_the_domain_qc_checks_against():
    from fprotoseg.app.routes.models import ModelView
    from fprotoseg.model.catalog import DEFAULT_MODEL_NAME, list_models

    view = ModelView.model_validate(list_models()[DEFAULT_MODEL_NAME].describe(DEFAULT_MODEL_NAME))
    assert view.domain is not None
    assert view.domain.stain == "H&E" and view.domain.organ == ["lung"] and view.domain.mpp == 1.0
    assert view.domain.classes == [c.name for c in view.classes]
    # the packaged model's stain range is shipped beside it and matched to its checkpoint
    from fprotoseg.model.segmenter import file_sha256
    from fprotoseg.worker.wsi.qc import find_reference

    class Packaged:  # matched by the checkpoint's bytes, whatever its manifest name
        checksum_sha256 = file_sha256(list_models()[DEFAULT_MODEL_NAME].path)
        name = "renamed"

    reference = find_reference(Packaged())
    assert reference is not None and reference["matched_by"] == "checkpoint_sha256"
    assert set(reference["stains"]) == {"haematoxylin", "eosin"}
