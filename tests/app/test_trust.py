"""Issue 11 in process (the real ASGI app, real SQLite, real sockets for callbacks): tenants,
callback URLs that cannot reach the network, honest errors, what a LIMS needs, the schema."""

from __future__ import annotations

import hashlib
import json
import socket
import stat
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient

from fprotoseg.app.main import create_app
from fprotoseg.model.errors import ConfigurationError
from fprotoseg.worker.service.callbacks import deliver_due, enqueue, signing_secret, verify
from fprotoseg.worker.service.jobstore import JobRecord, SqliteJobStore
from fprotoseg.worker.service.maintenance import apply_retention
from fprotoseg.worker.service.netguard import CallbackURLError, check_callback_url, resolve_for_delivery
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.states import QUEUED, SUCCEEDED
from fprotoseg.worker.service.storage import prepare_data_dir
from tests.app.live import CallbackRecorder

A = {"X-API-Key": "key-a"}
B = {"X-API-Key": "key-b"}
ADMIN = {"X-API-Key": "root-key"}
HASHED_D = "sha256:" + hashlib.sha256(b"key-d").hexdigest()


@pytest.fixture()
def slide_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "slide.tif"
    pixels = np.random.default_rng(2).integers(0, 255, (512, 640, 3), dtype=np.uint8)
    tifffile.imwrite(
        path, pixels, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4), resolutionunit=3
    )
    return path.read_bytes()


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path / "data",
        api_keys=["lab-a:key-a", "lab-b:key-b", "bare-key", f"lab-d:{HASHED_D}"],
        admin_keys=["root-key"],
        callback_allowed_hosts=["lims.hospital.internal", "10.20.0.0/16"],
        min_free_mb=0,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def post(client: TestClient, content: bytes, headers: dict, name: str = "s.tif", **fields):  # type: ignore[no-untyped-def]
    return client.post("/segment", files={"file": (name, content)}, data=fields, headers=headers)


# --- 1. tenants ----------------------------------------------------------------------------------
def test_a_tenant_sees_only_its_own_jobs(client: TestClient, slide_bytes: bytes) -> None:
    a = post(client, slide_bytes, {**A, "Idempotency-Key": "case-1"}, name="PATIENT-Doe-John-1970.svs")
    assert a.status_code == 202
    job_a = a.json()["job_id"]
    assert a.json()["job"]["tenant"] == "lab-a"

    listing = client.get("/jobs", headers=B).json()
    assert listing["total"] == 0 and listing["jobs"] == []
    missing = client.get("/jobs/no-such-job", headers=B)
    for path in (f"/jobs/{job_a}", f"/jobs/{job_a}/geojson", f"/jobs/{job_a}/stats"):
        r = client.get(path, headers=B)
        assert r.status_code == 404 == missing.status_code and r.json()["code"] == missing.json()["code"]
        assert "PATIENT" not in r.text
    assert client.delete(f"/jobs/{job_a}", headers=B).status_code == 404
    assert client.get(f"/jobs/{job_a}", headers=A).json()["state"] == QUEUED  # B cancelled nothing

    # same bytes, same Idempotency-Key from another tenant: its own new job, no replay
    b = post(client, slide_bytes, {**B, "Idempotency-Key": "case-1"}, name="PATIENT-Doe-John-1970.svs")
    assert b.status_code == 202 and b.headers.get("idempotent-replayed") is None
    assert b.json()["job_id"] != job_a
    again = post(client, slide_bytes, {**A, "Idempotency-Key": "case-1"}, name="PATIENT-Doe-John-1970.svs")
    assert again.json()["job_id"] == job_a and again.headers["idempotent-replayed"] == "true"

    admin = client.get("/jobs", headers=ADMIN).json()
    assert {j["job_id"] for j in admin["jobs"]} == {job_a, b.json()["job_id"]}
    assert client.get(f"/jobs/{job_a}", headers=ADMIN).status_code == 200


def test_bare_and_hashed_keys(client: TestClient, slide_bytes: bytes) -> None:
    bare = post(client, slide_bytes, {"X-API-Key": "bare-key"})
    assert bare.status_code == 202
    assert bare.json()["job"]["tenant"] == "key-" + hashlib.sha256(b"bare-key").hexdigest()[:16]
    hashed = post(client, slide_bytes, {"X-API-Key": "key-d"})
    assert hashed.status_code == 202 and hashed.json()["job"]["tenant"] == "lab-d"
    assert client.get("/jobs", headers={"X-API-Key": HASHED_D}).status_code == 401  # the hash is no key
    assert client.get("/jobs", headers={"X-API-Key": "lab-a:key-a"}).status_code == 401


def test_malformed_key_entries_fail_at_start() -> None:
    with pytest.raises(ValueError, match="no key"):
        Settings(api_keys=["lab-a:"])


# --- 2. callbacks ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6390/",
        "http://0x7f000001:6390/",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::127.0.0.1]/",
        "http://[::169.254.169.254]/latest/meta-data",
        "http://[::ffff:0:a9fe:a9fe]/",
        "http://[64:ff9b:1::7f00:1]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[2002:7f00:1::1]:6379/",
        "http://[2001:470:1::200:5efe:a9fe:a9fe]/",
        "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/",  # Teredo
        "http://192.0.0.8/",  # IANA special-purpose ranges Python 3.11.7 calls global
        "http://192.88.99.1/",
        "http://[fec0::1]/",
        "http://[100:0:0:1::1]/",
        "http://[4000::1]/",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.5/",
        "http://192.168.1.1./",
        "http://user:secret@lims.example/hook",
        "http://@lims.example/hook",
        "ftp://lims.example/hook",
        "file:///etc/passwd",
        "not a url",
    ],
)
def test_callback_urls_that_reach_inside_are_refused_at_submission(
    client: TestClient, slide_bytes: bytes, url: str
) -> None:
    r = post(client, slide_bytes, A, callback_url=url)
    assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text
    assert "secret" not in r.text
    assert [p for p in client.app.state.settings.uploads_dir.iterdir()] == []


@pytest.mark.parametrize(
    "url", ["https://lims.example/hooks/x", "http://lims.hospital.internal:8080/h", "http://10.20.3.4/h"]
)
def test_public_and_allowed_callback_urls_are_accepted(
    client: TestClient, slide_bytes: bytes, url: str
) -> None:
    r = post(client, slide_bytes, A, callback_url=url)
    assert r.status_code == 202 and r.json()["job"]["callback_url"] == url


def test_host_names_are_checked_when_resolved() -> None:
    with pytest.raises(CallbackURLError, match="not a public address"):
        resolve_for_delivery("http://localhost:9/x", [])
    target = resolve_for_delivery("http://localhost:9/x", ["localhost"])
    assert target.address in ("127.0.0.1", "::1")
    assert check_callback_url("http://localhost:9/x", []) == "http://localhost:9/x"  # a name: at delivery


class _Redirector:
    """Answers every POST with a redirect to ``location`` (which must never be followed)."""

    def __init__(self, location: str) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(307)
                self.send_header("Location", location)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def _finished_job(store: SqliteJobStore, url: str, **kw) -> JobRecord:  # type: ignore[no-untyped-def]
    rec = store.create(JobRecord(id=f"job-{time.monotonic_ns()}", callback_url=url, **kw))
    done = store.transition(rec.id, SUCCEEDED, [QUEUED], finished_at=time.time(), callback_status="pending")
    enqueue(store, done)
    assert done is not None
    return done


def test_delivery_is_signed_with_a_generated_secret_pinned_and_never_redirected(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path, callback_allowed_hosts=["localhost", "127.0.0.1"], callback_backoff_s=0.0
    )
    store = SqliteJobStore(settings.sqlite_path)
    hook, inner = CallbackRecorder(), CallbackRecorder()
    try:
        by_name = hook.url.replace("127.0.0.1", "localhost")
        rec = _finished_job(
            store,
            by_name,
            filename="Müller Biopsie #12 (B).svs",
            metadata={"external_id": "C-9"},
            idempotency_key="LIMS-4711",
        )
        redirected = _finished_job(store, _Redirector(inner.url).url)
        assert deliver_due(settings, store) == 2
        secret = settings.callback_secret_file.read_text().strip()
        assert stat.S_IMODE(settings.callback_secret_file.stat().st_mode) == 0o600
        assert signing_secret(settings) == secret  # stable: generated once
        ((headers, body),) = hook.received
        assert verify(secret, headers["X-Fprotoseg-Timestamp"], body, headers["X-Fprotoseg-Signature"])
        assert headers["Host"] == by_name.split("/")[2]  # pinned to the checked IP, Host kept
        payload = json.loads(body)
        assert payload["filename"] == "Müller Biopsie #12 (B).svs"
        assert payload["metadata"] == {"external_id": "C-9"} and payload["idempotency_key"] == "LIMS-4711"
        assert store.get(rec.id).callback_status == "delivered"
        assert inner.received == [] and store.get(redirected.id).callback_status == "failed"
    finally:
        hook.close()
        inner.close()


def test_a_receiver_that_never_answers_costs_the_job_nothing(tmp_path: Path) -> None:
    """The job ends at once; the outbox makes one bounded attempt per pass and reschedules."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/never"
    settings = Settings(
        data_dir=tmp_path,
        callback_allowed_hosts=["127.0.0.1"],
        callback_timeout_s=0.5,
        callback_attempts=2,
        callback_backoff_s=0.0,
    )
    store = SqliteJobStore(settings.sqlite_path)
    try:
        started = time.monotonic()
        rec = _finished_job(store, url)
        assert time.monotonic() - started < 0.5  # ending the job sent nothing
        assert deliver_due(settings, store) == 1
        assert store.get(rec.id).callback_status == "pending" and store.get(rec.id).callback_attempts == 1
        assert deliver_due(settings, store) == 1
        assert store.get(rec.id).callback_status == "failed" and store.due_callbacks(time.time() + 10) == []
    finally:
        silent.close()


# --- 4. honest errors ----------------------------------------------------------------------------
def test_out_of_range_queries_and_long_names_are_4xx(client: TestClient, slide_bytes: bytes) -> None:
    r = client.get("/jobs", params={"offset": 9223372036854775808}, headers=A)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    r = post(client, slide_bytes, A, name="x" * 5000 + ".svs")
    assert r.status_code == 422 and r.json()["code"] == "filename_too_long"
    r = client.post(
        "/segment", files={"file": ("s.tif", slide_bytes)}, headers={**A, "Idempotency-Key": "k" * 201}
    )
    assert r.status_code == 422
    r = client.options("/jobs/abc", headers=A)
    assert r.status_code == 405 and {"GET", "DELETE"} <= set(r.headers["allow"].replace(" ", "").split(","))


def test_readyz_fails_below_the_free_space_threshold(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", auth_disabled=True, min_free_mb=10**9)
    with TestClient(create_app(settings)) as c:
        c.app.state.store.heartbeat("embedded@test")
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["storage"] is False
        assert "FPROTOSEG_MIN_FREE_MB" in r.json()["detail"]
        up = c.post("/segment", files={"file": ("s.tif", b"II*\x00")})
        assert up.status_code == 507 and up.json()["code"] == "insufficient_storage"
        assert up.headers["retry-after"] and list(settings.uploads_dir.iterdir()) == []


def test_a_data_dir_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigurationError) as info:
        prepare_data_dir(blocker / "data")
    assert "FPROTOSEG_DATA_DIR" in info.value.message and "\n" not in info.value.message


# --- 5. LIMS ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Müller Biopsie #12 (B).svs", "病理.svs", "a'b;c d (1).svs"])
def test_the_client_file_name_and_metadata_are_kept_exactly(
    client: TestClient, slide_bytes: bytes, name: str
) -> None:
    r = post(client, slide_bytes, A, name=name, metadata=json.dumps({"external_id": "CASE-7", "n": 1}))
    assert r.status_code == 202, r.text
    job = client.get(f"/jobs/{r.json()['job_id']}", headers=A).json()
    assert job["upload"]["filename"] == name and job["metadata"] == {"external_id": "CASE-7", "n": 1}
    other = post(client, slide_bytes, A, name=name, external_id="CASE-8")
    assert other.json()["job_id"] != r.json()["job_id"]  # another case: a new job, not a replay
    assert other.json()["job"]["metadata"] == {"external_id": "CASE-8"}


@pytest.mark.parametrize("metadata", ["[1, 2]", "not json", json.dumps({"x": "y" * 5000})])
def test_bad_metadata_is_422(client: TestClient, slide_bytes: bytes, metadata: str) -> None:
    assert post(client, slide_bytes, A, metadata=metadata).status_code == 422


# --- 6. schema -------------------------------------------------------------------------------------
def test_the_schema_says_what_the_server_does(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": spec["components"]["securitySchemes"]["APIKeyHeader"]["description"],
    }
    media = {
        "geojson": "application/geo+json",
        "stats": "application/json",
        "mask": "image/tiff",
        "overlay": "image/png",
        "provenance": "application/json",
    }
    for name, mime in media.items():
        op = spec["paths"][f"/jobs/{{job_id}}/{name}"]["get"]
        binary = [] if "json" in mime else ["application/octet-stream"]  # a client generator's bytes
        assert list(op["responses"]["200"]["content"]) == [mime, *binary]
        assert {"401", "404", "503"} <= set(op["responses"])
        assert op["security"] == [{"APIKeyHeader": []}]
    seg = spec["paths"]["/segment"]["post"]
    assert {"202", "401", "413", "415", "422", "503", "507"} <= set(seg["responses"])
    for status, response in seg["responses"].items():
        if int(status) >= 400:
            assert list(response["content"]) == ["application/problem+json"]
    (idem,) = [p for p in seg["parameters"] if p["name"] == "Idempotency-Key"]
    assert idem["schema"]["anyOf"][0]["maxLength"] == 200
    form = seg["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert form["metadata"]["maxLength"] == 4096 and form["mpp"]["maximum"] == 100


# --- 7. data at rest -----------------------------------------------------------------------------
def test_retention_deletes_old_finished_jobs_and_counts_what_it_reclaimed(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, retention_days=1.0)
    store = SqliteJobStore(settings.sqlite_path)
    old, fresh, running = (store.create(JobRecord(id=i, upload_path=f"uploads/{i}.svs")) for i in "abc")
    for rec in (old, fresh, running):
        settings.uploads_dir.mkdir(exist_ok=True)
        (settings.data_dir / rec.upload_path).write_bytes(b"x" * 1000)
        settings.result_dir(rec.id).mkdir(parents=True)
        (settings.result_dir(rec.id) / "stats.json").write_bytes(b"y" * 500)
    store.transition(old.id, SUCCEEDED, [QUEUED], finished_at=time.time() - 2 * 86400)
    store.transition(fresh.id, SUCCEEDED, [QUEUED], finished_at=time.time())
    assert apply_retention(store, settings) == (1, 1500)
    assert store.get(old.id) is None and not (settings.jobs_dir / old.id).exists()
    assert not (settings.data_dir / old.upload_path).exists()
    assert store.get(fresh.id) is not None and store.get(running.id) is not None
    with TestClient(create_app(settings.model_copy(update={"auth_disabled": True}))) as c:
        text = c.get("/metrics").text
    assert "fprotoseg_retention_bytes_reclaimed_total 1500.0" in text
    assert "fprotoseg_retention_jobs_deleted_total 1.0" in text


def test_the_data_dir_is_private_and_git_ignored(tmp_path: Path) -> None:
    import subprocess

    settings = Settings(data_dir=tmp_path / "data", api_keys=["k"])
    with TestClient(create_app(settings)):
        pass
    for path in [settings.data_dir, settings.uploads_dir, settings.jobs_dir]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert stat.S_IMODE(settings.sqlite_path.stat().st_mode) == 0o600
    repo = Path(__file__).resolve().parents[2]
    ignored = subprocess.run(
        ["git", "-C", str(repo), "check-ignore", "-q", "fprotoseg-data/api-key"], check=False
    )
    assert ignored.returncode == 0
