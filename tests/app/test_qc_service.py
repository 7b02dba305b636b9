"""Slide QC through the service: a real ``fprotoseg serve`` (embedded worker), the DAPI NDPI over
real HTTP. The deployment refuses (FPROTOSEG_QC_POLICY=refuse); a request may ask to be warned."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.app.live import api_client, poll_job, wait_ready

DAPI = "slides/test3-DAPI-2-387.ndpi"


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    data_dir = tmp_path_factory.mktemp("qc-data")
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    env = {"FPROTOSEG_MAX_UPLOAD_MB": "16", "FPROTOSEG_MIN_FREE_MB": "0", "FPROTOSEG_QC_POLICY": "refuse"}
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
