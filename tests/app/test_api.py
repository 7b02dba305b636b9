"""The HTTP contract, in process (no worker running, so jobs stay queued): uploads, auth,
problem bodies, listing, cancel, readiness, metrics."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient

from fprotoseg.app.auth import load_or_create_api_key
from fprotoseg.app.main import create_app
from fprotoseg.worker.service.settings import Settings
from tests.app.live import assert_no_stack_trace

KEY = {"X-API-Key": "k-1"}


@pytest.fixture()
def slide_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "slide.tif"
    pixels = np.random.default_rng(1).integers(0, 255, (512, 640, 3), dtype=np.uint8)
    tifffile.imwrite(
        path, pixels, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4), resolutionunit=3
    )
    return path.read_bytes()


def make_client(tmp_path: Path, **overrides) -> TestClient:  # type: ignore[no-untyped-def]
    settings = Settings(data_dir=tmp_path / "data", api_keys=["k-1", "k-2"], **overrides)
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient]:
    with make_client(tmp_path) as c:
        yield c


def upload(client: TestClient, content: bytes, name: str = "s.tif", headers=None, **fields):  # type: ignore[no-untyped-def]
    return client.post(
        "/segment", files={"file": (name, content)}, data=fields, headers={**KEY, **(headers or {})}
    )


def test_upload_creates_a_queued_job_with_a_server_side_file(client: TestClient, slide_bytes: bytes) -> None:
    import hashlib

    r = upload(
        client, slide_bytes, name="../../etc/My Slide;rm -rf.tif", mpp="0.5", callback_url="https://lims/x"
    )
    assert r.status_code == 202
    body = r.json()
    assert r.headers["location"] == body["status_url"] == f"http://testserver/jobs/{body['job_id']}"
    response = client.get(f"/jobs/{body['job_id']}", headers=KEY)
    assert response.headers["retry-after"] == "2"  # polling hint while not finished
    job = response.json()
    assert job["state"] == "queued" and job["progress"] == 0 and job["error"] is None
    assert job["mpp"] == 0.5 and job["callback_url"] == "https://lims/x"
    assert job["upload"]["sha256"] == hashlib.sha256(slide_bytes).hexdigest()
    assert job["upload"]["size_bytes"] == len(slide_bytes) and job["upload"]["format"] == "tiff"
    # the client's name is kept exactly, as data; the stored file is named by the server
    assert job["upload"]["filename"] == "../../etc/My Slide;rm -rf.tif"
    assert job["created_at"].endswith("Z") and set(job["links"]) == {"self"}
    uploads = [p.name for p in (client.app.state.settings.uploads_dir).iterdir()]
    assert uploads == [f"{body['job_id']}.tif"]


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"mpp": "abc"}, "invalid_request"),
        ({"mpp": "-1"}, "invalid_request"),
        ({"mpp": "nan"}, "invalid_request"),
        ({"callback_url": "file:///etc/passwd"}, "invalid_request"),
        ({"callback_url": "not a url"}, "invalid_request"),
    ],
)
def test_bad_form_fields_are_422(client: TestClient, slide_bytes: bytes, fields: dict, code: str) -> None:
    r = upload(client, slide_bytes, **fields)
    assert r.status_code == 422 and r.json()["code"] == code
    assert list(client.app.state.settings.uploads_dir.iterdir()) == []  # nothing left behind


def test_request_shape_errors(client: TestClient) -> None:
    r = client.post(
        "/segment", content=b"raw bytes", headers={**KEY, "Content-Type": "application/octet-stream"}
    )
    assert r.status_code == 415 and r.headers["content-type"] == "application/problem+json"
    r = client.post("/segment", data={"mpp": "0.5"}, files={"other": ("a", b"b")}, headers=KEY)
    assert r.status_code == 422 and "file" in r.json()["detail"]


def test_a_multipart_body_cut_off_midway_is_refused(client: TestClient, slide_bytes: bytes) -> None:
    head = b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.tif"\r\n\r\n'
    r = client.post(
        "/segment",
        content=head + slide_bytes[: len(slide_bytes) // 2],
        headers={**KEY, "Content-Type": "multipart/form-data; boundary=XX"},
    )
    assert r.status_code == 400 and r.json()["code"] == "malformed_upload"
    assert list(client.app.state.settings.uploads_dir.iterdir()) == []


def test_uploads_over_the_cap_are_413(tmp_path: Path, slide_bytes: bytes) -> None:
    with make_client(tmp_path, max_upload_mb=0.25) as c:
        r = upload(c, slide_bytes + b"\0" * 300_000)
        assert r.status_code == 413 and r.json()["code"] == "upload_too_large"
        r = c.post(
            "/segment",
            headers={**KEY, "Content-Type": "multipart/form-data; boundary=x", "Content-Length": str(10**12)},
            content=b"",
        )
        assert r.status_code == 413  # refused from the declared length, before reading
        assert [p for p in c.app.state.settings.uploads_dir.iterdir()] == []


def test_same_bytes_and_parameters_return_the_existing_job(client: TestClient, slide_bytes: bytes) -> None:
    a = upload(client, slide_bytes).json()["job_id"]
    assert upload(client, slide_bytes).json()["job_id"] == a
    assert upload(client, slide_bytes, mpp="0.25").json()["job_id"] != a  # other parameters: a new job
    client.delete(f"/jobs/{a}", headers=KEY)
    assert upload(client, slide_bytes).json()["job_id"] != a  # a cancelled job is not reused


def test_auth(tmp_path: Path, slide_bytes: bytes) -> None:
    with make_client(tmp_path) as c:
        assert c.get("/jobs").status_code == 401
        assert c.get("/jobs", headers={"X-API-Key": "k-3"}).status_code == 401
        assert c.get("/jobs", headers={"X-API-Key": "k-2"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/openapi.json").status_code == 200
    with TestClient(create_app(Settings(data_dir=tmp_path / "d2"))) as closed:  # no key configured
        r = closed.get("/jobs", headers={"X-API-Key": "anything"})
        assert r.status_code == 401 and "FPROTOSEG_API_KEYS" in r.json()["detail"]
    with TestClient(create_app(Settings(data_dir=tmp_path / "d3", auth_disabled=True))) as open_:
        assert open_.get("/jobs").status_code == 200


def test_generated_api_key_is_private_and_stable(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    key, created = load_or_create_api_key(settings)
    assert created and len(key) >= 40
    assert stat.S_IMODE(settings.api_key_file.stat().st_mode) == 0o600
    assert load_or_create_api_key(settings) == (key, False)


def test_list_is_newest_first_and_paginated(client: TestClient, slide_bytes: bytes) -> None:
    ids = [upload(client, slide_bytes + bytes([i])).json()["job_id"] for i in range(5)]
    page = client.get("/jobs", params={"limit": 2}, headers=KEY).json()
    assert [j["job_id"] for j in page["jobs"]] == ids[::-1][:2] and page["total"] == 5
    nxt = client.get(page["next"], headers=KEY).json()
    assert [j["job_id"] for j in nxt["jobs"]] == ids[::-1][2:4]
    client.delete(f"/jobs/{ids[0]}", headers=KEY)
    cancelled = client.get("/jobs", params={"state": "cancelled"}, headers=KEY).json()
    assert [j["job_id"] for j in cancelled["jobs"]] == [ids[0]] and cancelled["next"] is None
    bad = client.get("/jobs", params={"limit": 0}, headers=KEY)
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"


def test_cancel_and_results_of_unfinished_jobs(client: TestClient, slide_bytes: bytes) -> None:
    job_id = upload(client, slide_bytes).json()["job_id"]
    for name in ("geojson", "stats", "mask", "overlay", "provenance"):
        r = client.get(f"/jobs/{job_id}/{name}", headers=KEY)
        assert r.status_code == 409 and r.json()["state"] == "queued"
    r = client.delete(f"/jobs/{job_id}", headers=KEY)
    assert r.status_code == 202 and r.json()["state"] == "cancelled"
    assert client.delete(f"/jobs/{job_id}", headers=KEY).status_code == 202  # idempotent
    assert client.get("/jobs/does-not-exist", headers=KEY).status_code == 404
    assert client.delete("/jobs/does-not-exist", headers=KEY).json()["code"] == "job_not_found"


def test_errors_are_problem_json_without_stack_traces(client: TestClient) -> None:
    def broken(job_id: str) -> None:
        raise RuntimeError("disk on fire at /secret/path")

    client.app.state.store.get = broken
    r = client.get("/jobs/abc", headers=KEY)
    assert r.status_code == 500 and r.headers["content-type"] == "application/problem+json"
    assert_no_stack_trace(r.text)
    assert "/secret/path" not in r.text
    for path, status in (("/nowhere", 404), ("/segment", 405)):
        r = client.get(path, headers=KEY)
        assert r.status_code == status and r.headers["content-type"] == "application/problem+json"


def test_readiness_follows_the_worker_heartbeat(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["checks"]["workers"] == 0
    client.app.state.store.heartbeat("embedded@test")
    r = client.get("/readyz")
    checks = r.json()["checks"]
    assert r.status_code == 200 and checks | {"free_mb": 0} == {
        "mode": "embedded",
        "storage": True,
        "free_mb": 0,
        "min_free_mb": 1024.0,
        "jobstore": True,
        "broker": True,
        "workers": 1,
    }
    assert checks["free_mb"] >= 1024


def test_metrics(client: TestClient, slide_bytes: bytes) -> None:
    upload(client, slide_bytes)
    text = client.get("/metrics").text
    assert 'fprotoseg_jobs{state="queued"} 1.0' in text
    assert "fprotoseg_queue_depth 1.0" in text
    assert "fprotoseg_job_duration_seconds_bucket" in text and "fprotoseg_tiles_per_second" in text
    assert 'fprotoseg_http_requests_total{method="POST",route="/segment",status="202"} 1.0' in text


def test_openapi_documents_the_upload(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/segment"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    fields = {"file", "mpp", "callback_url", "metadata", "external_id", "model", "roi", "qc_policy"}
    fields.add("outputs")
    assert set(body["properties"]) == fields
    assert body["properties"]["roi"]["type"] == "string"  # the GeoJSON as text in a form
    assert body["properties"]["roi"]["maxLength"] == 512 * 1024
    assert "/jobs/{job_id}/seg.dcm" in spec["paths"]
    assert body["properties"]["outputs"]["const"] == "probabilities"
    probabilities = spec["paths"]["/jobs/{job_id}/probabilities.ome.tiff"]["get"]["responses"]
    assert list(probabilities["200"]["content"]) == ["image/tiff", "application/octet-stream"]
    for path in ("/jobs", "/jobs/{job_id}", "/jobs/{job_id}/geojson", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"]
    job = spec["components"]["schemas"]["JobView"]["properties"]
    assert job["state"]["enum"] == ["queued", "running", "succeeded", "failed", "cancelled"]
    assert {"progress", "stage", "error", "links", "created_at"} <= set(job)
