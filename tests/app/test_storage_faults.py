"""Issue 22, item 6: storage faults at run time are honest 503s with a code, the client reads no
host, port or path, and the access log holds no secret."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient

from fprotoseg.app.main import create_app
from fprotoseg.worker.service.settings import Settings
from tests.app.live import API_KEY, Proc, fprotoseg_cmd, free_port, service_env, wait_http

KEY = {"X-API-Key": "k-1"}


def _slide_bytes(path: Path) -> bytes:
    pixels = np.random.default_rng(5).integers(0, 255, (256, 320, 3), dtype=np.uint8)
    tifffile.imwrite(
        path, pixels, tile=(128, 128), photometric="rgb", resolution=(2e4, 2e4), resolutionunit=3
    )
    return path.read_bytes()


def test_an_uploads_dir_that_is_gone_while_running_is_503_without_its_path(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", api_keys=["k-1"], min_free_mb=0)
    content = _slide_bytes(tmp_path / "s.tif")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        shutil.rmtree(settings.uploads_dir)
        settings.uploads_dir.write_text("not a folder any more")  # e.g. a volume that lost its mount
        r = client.post("/segment", files={"file": ("s.tif", content)}, headers=KEY)
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "storage_unavailable" and r.headers["retry-after"]
        assert str(tmp_path) not in r.text and "uploads" not in r.text
        assert client.get("/jobs", headers=KEY).json()["total"] == 0


@contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """``folder`` read-only for every path opened from now on, as a volume remounted read-only:
    a bind mount of it on itself, remounted ``ro``. Root ignores file modes, not a read-only mount
    (sessions and CI run as root). Files opened before stay open (SQLite's), as they would."""
    subprocess.run(["mount", "--bind", str(folder), str(folder)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_data_dir_turned_read_only_while_running_is_503(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Issue 22, item 6: a live server whose data dir becomes read-only answers uploads
    ``503 storage_unavailable`` with Retry-After (never 500, no server path), keeps answering
    reads, and takes uploads again once the volume is writable, without a restart."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root (sessions and CI run as root)")
    data_dir, roots = tmp_path / "data", tmp_path / "slides"
    roots.mkdir()
    slide = roots / "s.tif"
    content = _slide_bytes(slide)
    port = free_port()
    env = service_env(data_dir, tiny_checkpoint, FPROTOSEG_MIN_FREE_MB="0", FPROTOSEG_SLIDE_ROOTS=str(roots))
    proc = Proc(fprotoseg_cmd("serve", "--no-worker", "--host", "127.0.0.1", "--port", str(port)), env,
                tmp_path / "serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/healthz", proc, timeout_s=90)
        with httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=60) as client:
            first = client.post("/segment", files={"file": ("a.tif", content)})
            assert first.status_code == 202, first.text
            with _read_only(data_dir):
                with pytest.raises(OSError):
                    (data_dir / "uploads" / "probe").write_bytes(b"x")  # the fault is real
                for name, body in (("b.tif", content + b"\0"), ("a.tif", content)):  # new, and a replay
                    r = client.post("/segment", files={"file": (name, body)})
                    assert r.status_code == 503, r.text
                    assert r.json()["code"] == "storage_unavailable" and int(r.headers["retry-after"]) > 0
                    assert str(tmp_path) not in r.text and "Traceback" not in r.text
                # by reference nothing is uploaded: only the job store is written (its open file
                # may still take the write); either way an honest answer, never a 500
                ref = client.post("/segment", json={"slide_uri": slide.as_uri()})
                assert ref.status_code in (202, 503), ref.text
                if ref.status_code == 503:
                    assert ref.json()["code"] in ("storage_unavailable", "jobstore_unavailable")
                listing = client.get("/jobs")
                assert listing.status_code == 200 and first.json()["job_id"] in {
                    j["job_id"] for j in listing.json()["jobs"]
                }
                assert client.get(f"/jobs/{first.json()['job_id']}").status_code == 200
            again = client.post("/segment", files={"file": ("b.tif", content + b"\0")})
            assert again.status_code == 202, again.text  # writable again: no restart needed
    finally:
        proc.stop()
    log = proc.log()
    assert "Read-only file system" in log and "Traceback" not in log


def test_an_unreachable_job_store_is_503_without_its_address(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    settings = Settings(
        data_dir=tmp_path / "data", api_keys=["k-1"], broker_url=f"redis://127.0.0.1:{port}/0", min_free_mb=0
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for r in (client.get("/jobs", headers=KEY), client.get("/jobs/some-id", headers=KEY)):
            assert r.status_code == 503, r.text
            assert r.json()["code"] == "jobstore_unavailable" and r.headers["retry-after"]
            assert "127.0.0.1" not in r.text and str(port) not in r.text


def test_the_access_log_holds_no_token(tmp_path: Path, tiny_checkpoint: Path) -> None:
    port = free_port()
    env = service_env(tmp_path / "data", tiny_checkpoint, FPROTOSEG_MIN_FREE_MB="0")
    cmd = fprotoseg_cmd("serve", "--no-worker", "--access-log", "--host", "127.0.0.1", "--port", str(port))
    log_path = tmp_path / "serve.log"
    proc = Proc(cmd, env, log_path)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz", proc, timeout_s=90)
        secret = "1999999999.c0ffee" + "ab" * 30
        r = httpx.get(f"{base}/jobs/some-job/view", params={"token": secret, "page": "2"})
        assert r.status_code in (401, 403, 404)
        httpx.get(f"{base}/jobs", headers={"X-API-Key": API_KEY, "Authorization": "Bearer " + secret})
    finally:
        proc.stop()
    text = log_path.read_text()
    assert "/jobs/some-job/view?token=REDACTED&page=2" in text  # the request is still logged
    assert secret not in text and API_KEY not in text


def test_the_schema_names_its_operations_and_enumerates_states(tmp_path: Path) -> None:
    """Issue 22, item 7 (part): a generated client's methods are the routes' names, unique, and
    the 202's ``state`` is the enum of job states, not a bare string."""
    settings = Settings(data_dir=tmp_path / "data", api_keys=["k-1"])
    with TestClient(create_app(settings)) as client:
        spec = client.get("/openapi.json").json()
    ids = [op["operationId"] for item in spec["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    assert {"create_segmentation", "list_jobs", "get_job", "cancel_job", "get_mask", "get_stats"} <= set(ids)
    state = spec["components"]["schemas"]["SegmentAccepted"]["properties"]["state"]
    assert state.get("enum") or "JobState" in state.get("$ref", ""), state
