"""Slide QC through the service: a real ``fprotoseg serve`` (embedded worker), the DAPI NDPI over
real HTTP. The deployment refuses (FPROTOSEG_QC_POLICY=refuse); a request may ask to be warned.

And an inked slide (CMU-1-Small-Region with two marker strokes, written with tifffile) sent with
``outputs=probabilities`` and a callback: ``GET /jobs/{id}`` and the callback a real receiver gets
carry the QC summary (codes, artefact areas in µm²), and ``GET /jobs/{id}/probabilities.ome.tiff``
is the class probabilities as a multi-level OME-TIFF whose argmax is the mask."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.app.live import CallbackRecorder, api_client, poll_job, wait_ready

DAPI = "slides/test3-DAPI-2-387.ndpi"


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    data_dir = tmp_path_factory.mktemp("qc-data")
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    env = {"FPROTOSEG_MAX_UPLOAD_MB": "16", "FPROTOSEG_MIN_FREE_MB": "0", "FPROTOSEG_QC_POLICY": "refuse",
           "FPROTOSEG_CALLBACK_ALLOWED_HOSTS": "127.0.0.1"}  # the test's LIMS listens on loopback
    with api_client(data_dir, tiny_checkpoint, log, **env) as client:
        wait_ready(client)
        yield client


def test_dapi_is_refused_by_the_deployment_and_warned_on_request(refusing, shared_data: Path) -> None:
    client = refusing
    slide = (shared_data / DAPI).read_bytes()
    r = client.post("/segment", files={"file": ("dapi.ndpi", slide)})
    assert r.status_code == 202, r.text
    job = poll_job(client, r.json()["job_id"])
    assert job["state"] == "failed", job
    assert job["error"]["code"] == "not_brightfield_he"
    assert "fluorescence" in job["error"]["message"]
    assert job["tiles"] in (None, 0)  # refused before inference

    r = client.post("/segment", files={"file": ("dapi.ndpi", slide)}, data={"qc_policy": "warn"})
    assert r.status_code == 202, r.text
    job = poll_job(client, r.json()["job_id"])
    assert job["state"] == "succeeded", job
    stats = client.get(job["links"]["stats"]).json()
    assert any(w.startswith("not_brightfield_he:") for w in stats["warnings"])
    assert stats["qc"]["codes"] == ["not_brightfield_he"]
    qc = client.get(job["links"]["qc"])
    assert qc.status_code == 200 and qc.headers["content-type"].startswith("application/json")
    assert qc.json()["checks"]["brightfield_he"]["values"]["kind"] == "fluorescence"

    bad = client.post("/segment", files={"file": ("dapi.ndpi", slide)}, data={"qc_policy": "maybe"})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_request"


def _inked_slide(folder: Path, shared_data: Path) -> bytes:
    from fprotoseg.worker.wsi.slide import open_slide
    from tests.stubs import draw_ink_strokes, write_pyramid_tiff

    with open_slide(shared_data / "slides/CMU-1-Small-Region.svs") as slide:
        rgb = slide.read_level(0, 0, 0, slide.width_px, slide.height_px)
    return write_pyramid_tiff(folder / "inked.tiff", draw_ink_strokes(rgb)[0], 0.499, 2).read_bytes()


def test_job_view_callback_and_probabilities_of_an_inked_slide(refusing, shared_data: Path, tmp_path) -> None:
    import io
    import json
    import time

    import numpy as np
    import tifffile

    client = refusing
    lims = CallbackRecorder()
    try:
        slide = _inked_slide(tmp_path, shared_data)
        r = client.post(
            "/segment", files={"file": ("inked.tiff", slide)},
            data={"qc_policy": "warn", "outputs": "probabilities", "callback_url": lims.url},
        )
        assert r.status_code == 202, r.text
        assert r.json()["job"]["outputs"] == "probabilities" and r.json()["job"]["qc"] is None
        # a bound, not a sleep: on the 2-core host shared with a training run the job took minutes
        job = poll_job(client, r.json()["job_id"], timeout_s=900)
        assert job["state"] == "succeeded", job
        deadline = time.monotonic() + 60
        while not lims.received and time.monotonic() < deadline:
            time.sleep(0.2)
        assert lims.received, "no callback arrived"
        callback = json.loads(lims.received[0][1])
    finally:
        lims.close()

    stats = client.get(job["links"]["stats"]).json()
    qc = job["qc"]  # GET /jobs/{id}: the summary stats.json has, nothing fetched besides
    assert qc == stats["qc"] and qc["verdict"] in ("pass", "warn") and qc["policy"] == "warn"
    assert qc["artefact_area_um2"]["pen_ink"] > 100_000  # two strokes 150 µm wide, ~0.2 mm² each
    assert qc["excluded_area_um2"] > 0
    assert callback["qc"] == qc and callback["state"] == "succeeded"
    path = f"/jobs/{job['job_id']}/probabilities.ome.tiff"  # relative in callbacks without a public URL
    assert job["links"]["probabilities"].endswith(path) and callback["links"]["probabilities"] == path

    r = client.get(job["links"]["probabilities"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/tiff"
    mask = tifffile.imread(io.BytesIO(client.get(job["links"]["mask"]).content), level=0)
    with tifffile.TiffFile(io.BytesIO(r.content)) as tif:
        assert tif.is_ome and tif.series[0].is_pyramidal and len(tif.series[0].levels) >= 2
        probs = tif.series[0].levels[0].asarray()
        assert f'PhysicalSizeX="{stats["output_mpp"]!r}"' in tif.ome_metadata
    names = [c["name"] for c in stats["classes"]]
    assert probs.shape == (len(names), *mask.shape)
    tissue = mask > 0
    assert np.abs(probs.astype(int).sum(axis=0)[tissue] - 255).max() <= len(names)
    top = np.sort(probs, axis=0)
    untied = tissue & (top[-1] > top[-2])
    # the label map is the argmax, except where small regions were absorbed into their neighbours
    agree = (probs.argmax(axis=0)[untied] + 1 == mask[untied]).mean()
    assert agree > 0.97, agree

    # a job that did not ask: 404 with its code (the stored slide, so the same bytes, another job)
    r = client.post("/segment", files={"file": ("inked.tiff", slide)}, data={"qc_policy": "warn"})
    other = poll_job(client, r.json()["job_id"], timeout_s=900)
    assert other["state"] == "succeeded" and "probabilities" not in other["links"]
    r = client.get(f"/jobs/{other['job_id']}/probabilities.ome.tiff")
    assert r.status_code == 404 and r.json()["code"] == "probabilities_not_requested"
    bad = client.post("/segment", files={"file": ("inked.tiff", slide)}, data={"outputs": "logits"})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_request"
