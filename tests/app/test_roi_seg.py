"""Regions of interest and DICOM SEG through the real HTTP server (embedded worker) and the real
console script, on CMU-1-Small-Region and the DICOM WSI series made from it.

- a DICOM WSI job has ``GET /jobs/{id}/seg.dcm``: read back with highdicom it references the source
  series (study, series, frame of reference), has one segment per class with its name and colour,
  and its per-class areas equal stats.json (to 1%); a non-DICOM job answers ``404
  seg_not_available``; the CLI writes ``segmentation.seg.dcm`` for a series folder;
- an ROI (form field or JSON) measures only the tissue inside it from fewer tiles; malformed, empty
  and off-slide ROIs are refused ``422 invalid_roi`` before a job exists, a self-intersecting one
  fails its job with ``invalid_roi``; the CLI exits 2 with one line for each.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.app.live import api_client, assert_no_stack_trace, poll_job, wait_ready
from tests.test_cli_segment import run_cli

SLIDE = "slides/CMU-1-Small-Region.svs"
WIDTH_PX, HEIGHT_PX = 2220, 2967
LEFT_HALF = {
    "type": "Feature",
    "geometry": {
        "type": "Polygon",
        "coordinates": [[[0, 0], [WIDTH_PX / 2, 0], [WIDTH_PX / 2, HEIGHT_PX], [0, HEIGHT_PX], [0, 0]]],
    },
    "properties": {"objectType": "annotation"},
}
BOW_TIE = {"type": "Polygon", "coordinates": [[[0, 0], [600, 500], [600, 0], [0, 300], [0, 0]]]}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, dicom_series: Path):
    data_dir = tmp_path_factory.mktemp("roiseg-data")
    log = tmp_path_factory.mktemp("roiseg-logs") / "serve.log"
    env = {"FPROTOSEG_SLIDE_ROOTS": str(dicom_series.parent), "FPROTOSEG_BATCH_SIZE": "8",
           "FPROTOSEG_MIN_FREE_MB": "0"}
    with api_client(data_dir, tiny_checkpoint, log, **env) as client:
        wait_ready(client)
        yield client


def _succeeded(client: httpx.Client, response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 202, response.text
    job = poll_job(client, response.json()["job_id"])
    assert job["state"] == "succeeded", job
    return job


def _spacing_mm(seg: Any) -> tuple[float, float]:
    row_mm, col_mm = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    return float(row_mm), float(col_mm)


def _seg_areas_um2(seg: Any) -> tuple[dict[str, float], np.ndarray]:
    labels = seg.get_total_pixel_matrix(combine_segments=True)
    row_mm, col_mm = _spacing_mm(seg)
    counts = np.bincount(labels.ravel(), minlength=len(seg.SegmentSequence) + 1)
    areas = {s.SegmentLabel: counts[s.SegmentNumber] * row_mm * col_mm * 1e6 for s in seg.SegmentSequence}
    return areas, labels


def _check_seg_against_stats(seg: Any, stats: dict[str, Any], source: Any) -> None:
    areas, labels = _seg_areas_um2(seg)
    for c in stats["classes"]:
        assert areas[c["name"]] == pytest.approx(c["area_um2"], rel=0.01, abs=1.0), c["name"]
    assert labels.shape == (seg.TotalPixelMatrixRows, seg.TotalPixelMatrixColumns)
    assert list(_spacing_mm(seg)) == pytest.approx([stats["output_mpp"] / 1000] * 2, rel=0.01)
    # the source series: same study and frame of reference, its series and instance referenced
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # one segment per class: its name and its colour (CIELab -> RGB within rounding)
    import highdicom as hd

    assert [s.SegmentLabel for s in seg.SegmentSequence] == [c["name"] for c in stats["classes"]]
    for s, c in zip(seg.SegmentSequence, stats["classes"], strict=True):
        rgb = hd.color.CIELabColor.from_dicom_value(s.RecommendedDisplayCIELabValue).to_rgb(clip=True)
        assert np.abs(np.array(rgb) - np.array(c["color"])).max() <= 2
    assert seg.SegmentationType == "BINARY" and int(seg.Rows) == int(seg.Columns) == 256


def _source(series: Path) -> Any:
    from fprotoseg.worker.wsi.dicom_seg import level0_source

    return level0_source(series)


def test_dicom_job_has_a_seg_with_the_areas_of_stats(server, dicom_series: Path) -> None:
    import highdicom as hd

    client = server
    uri = "file://" + str(dicom_series).replace(" ", "%20")
    job = _succeeded(client, client.post("/segment", json={"slide_uri": uri}))
    r = client.get(f"/jobs/{job['job_id']}/seg.dcm")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    seg = hd.seg.segread(io.BytesIO(r.content))
    _check_seg_against_stats(seg, client.get(job["links"]["stats"]).json(), _source(dicom_series))


def test_rois_through_the_server(server, shared_data: Path) -> None:
    client = server
    slide = (shared_data / SLIDE).read_bytes()
    whole = _succeeded(client, client.post("/segment", files={"file": ("CMU-1-Small-Region.svs", slide)}))
    # no SEG for a non-DICOM input
    r = client.get(f"/jobs/{whole['job_id']}/seg.dcm")
    assert r.status_code == 404 and r.json()["code"] == "seg_not_available"
    half = _succeeded(client, client.post(
        "/segment", files={"file": ("CMU-1-Small-Region.svs", slide)}, data={"roi": json.dumps(LEFT_HALF)}
    ))
    whole_stats = client.get(whole["links"]["stats"]).json()
    half_stats = client.get(half["links"]["stats"]).json()
    import tifffile

    labels = tifffile.imread(io.BytesIO(client.get(whole["links"]["mask"]).content), level=0)
    cut = round(WIDTH_PX / 2 * whole_stats["slide"]["mpp"] / whole_stats["output_mpp"])
    inside_um2 = (labels[:, :cut] > 0).sum() * whole_stats["output_mpp"] ** 2
    # 2.5%: slide QC is judged within the ROI (its focus reference is the ROI's own tissue)
    assert half_stats["tissue_area_um2"] == pytest.approx(inside_um2, rel=0.025)
    assert half_stats["tissue_area_um2"] < 0.75 * whole_stats["tissue_area_um2"]
    whole_prov = client.get(whole["links"]["provenance"]).json()
    half_prov = client.get(half["links"]["provenance"]).json()
    assert half_prov["tiles"]["inferred"] < whole_prov["tiles"]["inferred"]
    assert half_prov["roi"]["geometry"]["type"] == "MultiPolygon" and "roi" not in whole_prov

    # refused before a job exists: 422 invalid_roi, as a form field and in a JSON body
    jobs_before = client.get("/jobs").json()["total"]
    unclosed = {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [10, 10], [0, 10]]]}
    outside = {"type": "Polygon", "coordinates": [[[5000, 0], [6000, 0], [6000, 90], [5000, 0]]]}
    empty = {"type": "FeatureCollection", "features": []}
    for roi in ("{not json", json.dumps(unclosed), json.dumps(outside), json.dumps(empty)):
        r = client.post("/segment", files={"file": ("CMU-1-Small-Region.svs", slide)}, data={"roi": roi})
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["code"] == "invalid_roi" and "\n" not in body["detail"], body
        assert_no_stack_trace(r.text)
    point = {"type": "Point", "coordinates": [1, 2]}
    r = client.post("/segment", json={"slide_uri": "file:///nowhere/x.svs", "roi": point})
    assert r.status_code == 422 and r.json()["code"] == "invalid_roi", r.text
    assert client.get("/jobs").json()["total"] == jobs_before
    # what only geometry can tell (a self-intersection) is refused by the worker, before a tile
    files = {"file": ("CMU-1-Small-Region.svs", slide)}
    r = client.post("/segment", files=files, data={"roi": json.dumps(BOW_TIE)})
    assert r.status_code == 202, r.text
    job = poll_job(client, r.json()["job_id"])
    assert job["state"] == "failed" and job["error"]["code"] == "invalid_roi", job
    assert "Self-intersection" in job["error"]["message"]


def test_cli_writes_the_seg_and_refuses_bad_rois(tmp_path: Path, tiny_checkpoint: Path, dicom_series: Path,
                                                shared_data: Path) -> None:
    import highdicom as hd

    out = tmp_path / "out"
    roi_file = tmp_path / "left-half.geojson"
    roi_file.write_text(json.dumps({"type": "FeatureCollection", "features": [LEFT_HALF]}))
    proc = run_cli("segment", str(dicom_series), "--out", str(out), "--checkpoint", str(tiny_checkpoint),
                   "--device", "cpu", "--no-progress", "--roi", str(roi_file))
    assert proc.returncode == 0, proc.stderr
    assert "region of interest" in proc.stdout
    stats = json.loads((out / "stats.json").read_text())
    seg = hd.seg.segread(out / "segmentation.seg.dcm")
    _check_seg_against_stats(seg, stats, _source(dicom_series))
    _, labels = _seg_areas_um2(seg)
    validator = shutil.which("dciodvfy")  # Debian's dicom3tools, where installed
    if validator:
        seg_path = str(out / "segmentation.seg.dcm")
        checked = subprocess.run([validator, seg_path], capture_output=True, text=True, timeout=120)
        report = checked.stdout + checked.stderr
        assert "Segmentation" in report
        assert [line for line in report.splitlines() if line.startswith("Error")] == [], report
    cut = round(WIDTH_PX / 2 * stats["slide"]["mpp"] / stats["output_mpp"])
    assert labels[:, cut + 1 :].max() == 0  # the SEG is cut to the ROI as well

    bad = {
        "not-json.geojson": "{not json",
        "bow-tie.geojson": json.dumps(BOW_TIE),
        "empty.geojson": json.dumps({"type": "FeatureCollection", "features": []}),
        "outside.geojson": json.dumps(
            {"type": "Polygon", "coordinates": [[[0, 4000], [90, 4000], [90, 5000], [0, 4000]]]}
        ),
    }
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        bad_out = tmp_path / f"out-{name}"
        proc = run_cli("segment", str(shared_data / SLIDE), "--out", str(bad_out), "--checkpoint",
                       str(tiny_checkpoint), "--device", "cpu", "--no-progress",
                       "--roi", str(tmp_path / name))
        assert proc.returncode == 2, (name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fprotoseg: error: invalid ROI"), (name, proc.stderr)
        assert not bad_out.exists()
