"""End to end on the embedded default: a real ``fprotoseg serve`` process (uvicorn + the local
worker process, SQLite, no Redis), a real slide over real HTTP, every result downloaded."""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import struct
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.app.live import (
    api_client,
    api_server,
    assert_no_stack_trace,
    check_qupath_geojson,
    poll_job,
    wait_ready,
)

SLIDE = "slides/CMU-1-Small-Region.svs"


def fetch_and_check_results(client: httpx.Client, job: dict, slide_bytes: bytes) -> None:
    """Download every result of a succeeded job and check it against the contract."""
    import hashlib

    import numpy as np
    import tifffile
    from PIL import Image

    links = job["links"]
    assert set(links) == {"self", "geojson", "stats", "mask", "overlay", "provenance", "qc", "view"}
    stats = client.get(links["stats"]).json()
    width, height = stats["slide"]["width"], stats["slide"]["height"]
    assert (width, height) == (2220, 2967)

    plain = client.get(links["geojson"], headers={"Accept-Encoding": "identity"})
    assert plain.status_code == 200 and plain.headers["content-type"].startswith("application/geo+json")
    assert plain.headers.get("content-encoding") is None
    collection = plain.json()
    assert check_qupath_geojson(collection, width, height) >= 1

    with client.stream("GET", links["geojson"], headers={"Accept-Encoding": "gzip"}) as zipped:
        assert zipped.headers["content-encoding"] == "gzip"
        raw = b"".join(zipped.iter_raw())
    assert json.loads(gzip.decompress(raw)) == collection

    names = {c["name"] for c in stats["classes"]}
    assert {f["properties"]["classification"]["name"] for f in collection["features"]} <= names

    mask = client.get(links["mask"])
    assert mask.headers["content-type"] == "image/tiff"
    labels = tifffile.imread(io.BytesIO(mask.content))
    assert labels.ndim == 2 and labels.dtype.kind == "u" and int(labels.max()) <= len(names)
    assert np.unique(labels).size >= 2

    overlay = client.get(links["overlay"])
    assert overlay.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(overlay.content)).size[0] > 0

    provenance = client.get(links["provenance"]).json()
    assert provenance["slide"]["sha256"] == hashlib.sha256(slide_bytes).hexdigest()
    assert job["upload"]["sha256"] == provenance["slide"]["sha256"]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    data_dir = tmp_path_factory.mktemp("embedded-data")
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    env = {
        "FPROTOSEG_MAX_UPLOAD_MB": "16",
        "FPROTOSEG_BATCH_SIZE": "4",
        "FPROTOSEG_CANCEL_POLL_INTERVAL_S": "0.2",
        "FPROTOSEG_CALLBACK_ALLOWED_HOSTS": "127.0.0.1",
        "FPROTOSEG_MIN_FREE_MB": "0",
    }
    with api_client(data_dir, tiny_checkpoint, log, **env) as client:
        wait_ready(client)
        yield client, data_dir, log


def test_slide_end_to_end_on_embedded_default(embedded, shared_data: Path) -> None:
    client, _, _ = embedded
    slide = (shared_data / SLIDE).read_bytes()
    r = client.post("/segment", files={"file": ("CMU-1-Small-Region.svs", slide)})
    assert r.status_code == 202, r.text
    body = r.json()
    assert r.headers["location"] == body["status_url"]
    job = poll_job(client, body["job_id"])
    assert job["state"] == "succeeded", job
    assert job["progress"] == 1.0 and job["error"] is None and job["tiles"] > 0
    fetch_and_check_results(client, job, slide)

    listing = client.get("/jobs", params={"limit": 1}).json()
    assert listing["jobs"][0]["job_id"] == body["job_id"] or listing["total"] >= 1
    metrics = client.get("/metrics").text
    assert 'fprotoseg_jobs{state="succeeded"}' in metrics
    assert "fprotoseg_job_duration_seconds_count" in metrics


def test_auth_missing_or_wrong_key_is_401(embedded) -> None:
    client, _, _ = embedded
    base = str(client.base_url)
    for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": ""}):
        for method, path in (
            ("GET", "/jobs"),
            ("POST", "/segment"),
            ("GET", "/jobs/x"),
            ("DELETE", "/jobs/x"),
        ):
            r = httpx.request(method, base + path, headers=headers, timeout=10)
            assert r.status_code == 401, (method, path, r.text)
            assert r.headers["content-type"] == "application/problem+json"
    assert httpx.get(base + "/healthz", timeout=10).status_code == 200


def _tiff_claiming(width_px: int, height_px: int) -> bytes:
    """A little-endian TIFF whose one directory claims huge dimensions and has one tiny strip."""
    entries = [
        (256, 4, 1, width_px),
        (257, 4, 1, height_px),
        (258, 3, 1, 8),
        (259, 3, 1, 1),
        (262, 3, 1, 1),
        (273, 4, 1, 8 + 2 + 8 * 12 + 4),
        (278, 4, 1, height_px),
        (279, 4, 1, 16),
    ]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0" * 16


def hostile_uploads(shared_data: Path) -> list[tuple[str, str, bytes]]:
    slide = (shared_data / SLIDE).read_bytes()
    rng = random.Random(7)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("slide.svs", slide[:50_000])
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 100, 150)).save(png, format="PNG")
    return [
        ("empty", "empty.svs", b""),
        ("random", "random.svs", bytes(rng.getrandbits(8) for _ in range(100_000))),
        ("text named .svs", "notes.svs", b"patient: anonymous\nthis is not a slide\n" * 100),
        ("truncated svs", "cut.svs", slide[: len(slide) // 3]),
        ("200000x200000 tiff", "bomb.tif", _tiff_claiming(200_000, 200_000)),
        ("png", "image.png", png.getvalue()),
        ("zip", "slide.zip", zbuf.getvalue()),
        ("gzip", "slide.svs.gz", gzip.compress(slide)),
        ("path traversal name", "../../../etc/passwd.svs", slide),
        ("over the cap", "big.svs", slide + os.urandom(16 * 1024 * 1024)),
    ]


def test_hostile_uploads_then_a_good_slide(embedded, shared_data: Path) -> None:
    client, data_dir, _ = embedded
    job_ids = []
    for label, name, content in hostile_uploads(shared_data):
        r = client.post(
            "/segment", files={"file": (name, content)}, headers={"Idempotency-Key": f"hostile-{label}"}
        )
        assert_no_stack_trace(r.text)
        print(f"hostile {label!r}: {r.status_code} {r.text[:160]}")
        if r.status_code == 202:
            job_ids.append((label, r.json()["job_id"]))
        else:
            assert 400 <= r.status_code < 500, (label, r.status_code, r.text)
            assert r.headers["content-type"] == "application/problem+json", label
            assert r.json()["detail"], label
        assert client.get("/healthz").status_code == 200
    for label, job_id in job_ids:
        job = poll_job(client, job_id)
        if label == "path traversal name":  # a real slide: the name is only a label
            assert job["state"] == "succeeded", job
            assert job["upload"]["filename"] == "../../../etc/passwd.svs"  # kept as data, never a path
        else:
            assert job["state"] == "failed", (label, job)
            print(f"hostile {label!r}: job failed {job['error']}")
            assert job["error"]["code"] and job["error"]["message"], job
            assert_no_stack_trace(json.dumps(job))
    # nothing was written outside the data dir, and uploads are named by the server
    for path in (data_dir / "uploads").iterdir():
        assert path.name.split(".")[0].count("-") == 4, path.name  # <uuid>.<ext>
    good = (shared_data / SLIDE).read_bytes() + b"distinct"  # trailing bytes: a new job, same pixels
    r = client.post("/segment", files={"file": ("good.svs", good)})
    assert r.status_code == 202, r.text
    assert poll_job(client, r.json()["job_id"])["state"] == "succeeded"


def test_idempotency_and_content_dedupe(embedded, shared_data: Path) -> None:
    client, _, _ = embedded
    slide = (shared_data / SLIDE).read_bytes() + b"idem"
    first = client.post("/segment", files={"file": ("a.svs", slide)}, headers={"Idempotency-Key": "lims-42"})
    again = client.post("/segment", files={"file": ("a.svs", slide)}, headers={"Idempotency-Key": "lims-42"})
    same_bytes = client.post("/segment", files={"file": ("a.svs", slide)})
    other_name = client.post("/segment", files={"file": ("b.svs", slide)})
    assert first.status_code == again.status_code == same_bytes.status_code == 202
    assert first.json()["job_id"] == again.json()["job_id"] == same_bytes.json()["job_id"]
    assert other_name.json()["job_id"] != first.json()["job_id"]  # described as another slide
    assert again.headers["idempotent-replayed"] == "true"
    other = client.post(
        "/segment", files={"file": ("c.svs", slide + b"x")}, headers={"Idempotency-Key": "lims-42"}
    )
    assert other.status_code == 422 and other.json()["code"] == "idempotency_key_reused"
    poll_job(client, first.json()["job_id"])


def test_api_restart_loses_no_job_and_no_result(
    tmp_path: Path, tiny_checkpoint: Path, shared_data: Path
) -> None:
    slide = (shared_data / SLIDE).read_bytes()
    data_dir = tmp_path / "data"
    with api_client(data_dir, tiny_checkpoint, tmp_path / "first.log") as client:
        job_id = client.post("/segment", files={"file": ("s.svs", slide)}).json()["job_id"]
        done = poll_job(client, job_id)
        assert done["state"] == "succeeded"
        geojson = client.get(f"/jobs/{job_id}/geojson").content
    with api_client(data_dir, tiny_checkpoint, tmp_path / "second.log") as client:
        again = client.get(f"/jobs/{job_id}").json()
        assert again["state"] == "succeeded" and again["finished_at"] == done["finished_at"]
        assert client.get(f"/jobs/{job_id}/geojson").content == geojson
        assert client.get("/jobs").json()["total"] == 1


def test_serve_without_a_configured_key_generates_one_once(tmp_path: Path, tiny_checkpoint: Path) -> None:
    import stat

    data_dir = tmp_path / "data"
    log = tmp_path / "serve.log"
    with api_server(data_dir, tiny_checkpoint, log, FPROTOSEG_API_KEYS="") as url:
        key_file = data_dir / "api-key"
        key = key_file.read_text().strip()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key) >= 40
        assert key in log.read_text()  # printed at start-up for the user to copy
        assert httpx.get(url + "/jobs", timeout=10).status_code == 401
        assert httpx.get(url + "/jobs", headers={"X-API-Key": key}, timeout=10).status_code == 200
    with api_server(data_dir, tiny_checkpoint, tmp_path / "again.log", FPROTOSEG_API_KEYS="") as url:
        assert key_file.read_text().strip() == key  # the same key after a restart
        assert httpx.get(url + "/jobs", headers={"X-API-Key": key}, timeout=10).status_code == 200


def test_delete_cancels_a_running_job(embedded, shared_data: Path, tmp_path: Path) -> None:
    import time

    from tests.app.live import write_mosaic_slide

    client, data_dir, _ = embedded
    mosaic = tmp_path / "mosaic.tif"
    write_mosaic_slide(shared_data / SLIDE, mosaic, (3, 3))
    with mosaic.open("rb") as fh:
        job_id = client.post("/segment", files={"file": ("mosaic.tif", fh)}).json()["job_id"]
    deadline = time.monotonic() + 120
    job = {}
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["state"] == "running" and job["stage"] == "inference":
            break
        time.sleep(0.1)
    assert job["state"] == "running", job
    r = client.delete(f"/jobs/{job_id}")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    done = poll_job(client, job_id, timeout_s=60)
    assert done["state"] == "cancelled" and done["progress"] < 1.0
    assert client.get(f"/jobs/{job_id}/geojson").status_code == 409
    assert not (data_dir / "jobs" / job_id / "results").exists()
    assert client.delete(f"/jobs/{job_id}").status_code == 202


def test_a_lims_can_match_every_result_to_its_case(embedded, shared_data: Path) -> None:
    """The client's exact file name, metadata and Idempotency-Key in the job, stats.json,
    provenance.json and the (signed, pinned) callback; no server path anywhere; files private."""
    import stat
    import time

    from fprotoseg.worker.service.callbacks import verify
    from tests.app.live import CallbackRecorder

    client, data_dir, _ = embedded
    hook = CallbackRecorder()
    name = "Müller Biopsie #12 (B) 病理.svs"
    try:
        r = client.post(
            "/segment",
            files={"file": (name, (shared_data / SLIDE).read_bytes() + b"lims")},
            data={"callback_url": hook.url, "metadata": json.dumps({"external_id": "CASE-4711"})},
            headers={"Idempotency-Key": "LIMS-4711"},
        )
        assert r.status_code == 202, r.text
        job = poll_job(client, r.json()["job_id"])
        assert job["state"] == "succeeded" and job["upload"]["filename"] == name
        deadline = time.monotonic() + 30
        while not hook.received and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        hook.close()
    stats = client.get(job["links"]["stats"]).json()
    provenance_text = client.get(job["links"]["provenance"]).text
    provenance = json.loads(provenance_text)
    for doc in (stats, provenance):
        assert doc["slide"]["file"] == name
        assert doc["job"]["filename"] == name and doc["job"]["metadata"] == {"external_id": "CASE-4711"}
        assert doc["job"]["idempotency_key"] == "LIMS-4711"
        assert doc["job"]["model"] == job["model"] == "tiny"  # the default model, by its name (was null)
    assert "path" not in provenance["slide"]
    assert str(data_dir) not in provenance_text and job["job_id"] + ".svs" not in provenance_text
    (headers, body), = hook.received
    secret = (data_dir / "callback-secret").read_text().strip()  # generated per install
    assert verify(secret, headers["X-Fprotoseg-Timestamp"], body, headers["X-Fprotoseg-Signature"])
    payload = json.loads(body)
    assert payload["filename"] == name and payload["idempotency_key"] == "LIMS-4711"
    assert payload["metadata"] == {"external_id": "CASE-4711"}
    assert client.get(f"/jobs/{job['job_id']}").json()["callback_status"] == "delivered"
    for root, dirs, files in os.walk(data_dir):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700, d
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o600, f
