"""Issue 22, item 6: storage faults at run time are honest 503s with a code, the client reads no
host, port or path, and the access log holds no secret."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import numpy as np
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
