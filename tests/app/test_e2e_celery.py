"""End to end with Redis and Celery: a real API process (``fprotoseg serve`` with a broker, API
only) and real ``fprotoseg worker`` processes; a worker SIGKILLed mid-job is replaced and the job
still succeeds exactly once."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.app.live import (
    CallbackRecorder,
    Proc,
    api_client,
    check_qupath_geojson,
    fprotoseg_cmd,
    poll_job,
    redis_url_for_tests,
    service_env,
    wait_ready,
    write_mosaic_slide,
)
from tests.app.test_e2e_embedded import SLIDE, _tiff_claiming, fetch_and_check_results

CALLBACK_SECRET = "callback-secret-for-tests"


@pytest.fixture()
def redis_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    with redis_url_for_tests(tmp_path) as (url, prefix):
        yield {
            "FPROTOSEG_BROKER_URL": url,
            "FPROTOSEG_REDIS_KEY_PREFIX": prefix,
            "FPROTOSEG_QUEUE": prefix + "jobs",
            "FPROTOSEG_CALLBACK_ALLOWED_HOSTS": "127.0.0.1",  # the test's LIMS listens on loopback
            # a killed worker's job is requeued by the API within seconds (heartbeat), not hours
            "FPROTOSEG_JOB_HEARTBEAT_INTERVAL_S": "1",
            "FPROTOSEG_JOB_HEARTBEAT_TIMEOUT_S": "6",
            "FPROTOSEG_MAINTENANCE_INTERVAL_S": "1",
            "FPROTOSEG_MIN_FREE_MB": "0",
        }


def start_worker(data_dir: Path, checkpoint: Path, log: Path, env_extra: dict[str, str]) -> Proc:
    env = service_env(data_dir, checkpoint, **env_extra)
    return Proc(fprotoseg_cmd("worker", "--loglevel", "INFO"), env, log)


def test_slide_end_to_end_with_redis_and_celery(
    tmp_path: Path, tiny_checkpoint: Path, shared_data: Path, redis_env: dict[str, str]
) -> None:
    data_dir = tmp_path / "data"
    slide = (shared_data / SLIDE).read_bytes()
    hook = CallbackRecorder()
    env = {**redis_env, "FPROTOSEG_CALLBACK_SECRET": CALLBACK_SECRET}
    worker = start_worker(data_dir, tiny_checkpoint, tmp_path / "worker.log", env)
    try:
        with api_client(data_dir, tiny_checkpoint, tmp_path / "api.log", **env) as client:
            ready = wait_ready(client)
            assert ready["checks"]["mode"] == "celery" and ready["checks"]["workers"] >= 1
            r = client.post("/segment", files={"file": ("CMU.svs", slide)}, data={"callback_url": hook.url})
            assert r.status_code == 202, r.text
            job = poll_job(client, r.json()["job_id"])
            assert job["state"] == "succeeded", (job, worker.log())
            fetch_and_check_results(client, job, slide)
            bomb = client.post("/segment", files={"file": ("bomb.tif", _tiff_claiming(200_000, 200_000))})
            failed = poll_job(client, bomb.json()["job_id"])
            assert failed["state"] == "failed" and failed["error"]["code"] == "slide_too_large", failed
            deadline = time.monotonic() + 10
            while not hook.received and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        worker.stop()
        hook.close()
    assert [json.loads(b)["state"] for _, b in hook.received] == ["succeeded"]  # no callback_url on the bomb
    headers, body = hook.received[0]
    from fprotoseg.worker.service.callbacks import verify

    assert verify(CALLBACK_SECRET, headers["X-Fprotoseg-Timestamp"], body, headers["X-Fprotoseg-Signature"])
    payload = json.loads(body)
    assert payload["job_id"] == job["job_id"] and payload["state"] == "succeeded"
    assert payload["upload_sha256"] == hashlib.sha256(slide).hexdigest()


@pytest.mark.slow
def test_worker_sigkill_mid_job_then_new_worker_succeeds_once(
    tmp_path: Path, tiny_checkpoint: Path, shared_data: Path, redis_env: dict[str, str]
) -> None:
    """SIGKILL the whole worker (main process and pool child) during inference; a new worker
    gets the job after the visibility timeout; it ends succeeded once, with complete results."""
    slide_path = tmp_path / "mosaic.tif"
    width, height = write_mosaic_slide(shared_data / SLIDE, slide_path, (3, 3))
    data_dir = tmp_path / "data"
    hook = CallbackRecorder()
    env = {
        **redis_env,
        "FPROTOSEG_CALLBACK_SECRET": CALLBACK_SECRET,
        "FPROTOSEG_BATCH_SIZE": "4",  # many small batches: the kill lands mid-inference
        # The job takes ~17 s here; redelivery comes 50 s after the first delivery.
        "FPROTOSEG_JOB_SOFT_TIME_LIMIT_S": "40",
        "FPROTOSEG_JOB_HARD_TIME_LIMIT_S": "45",
        "FPROTOSEG_VISIBILITY_TIMEOUT_S": "50",
        "FPROTOSEG_UNACKED_RESTORE_INTERVAL_S": "2",
    }
    first = start_worker(data_dir, tiny_checkpoint, tmp_path / "worker1.log", env)
    second = None
    try:
        with api_client(data_dir, tiny_checkpoint, tmp_path / "api.log", **env) as client:
            wait_ready(client)
            with slide_path.open("rb") as fh:
                r = client.post(
                    "/segment", files={"file": ("mosaic.tif", fh)}, data={"callback_url": hook.url}
                )
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                job = client.get(f"/jobs/{job_id}").json()
                if job["state"] == "running" and job["stage"] == "inference" and job["progress"] > 0.1:
                    break
                assert job["state"] in ("queued", "running"), (job, first.log())
                time.sleep(0.1)
            else:
                raise AssertionError(f"job never reached inference: {job}\n{first.log()}")
            first.kill_group()
            killed_at = client.get(f"/jobs/{job_id}").json()
            assert killed_at["state"] == "running" and killed_at["attempts"] == 1
            assert not (data_dir / "jobs" / job_id / "results").exists()

            second = start_worker(data_dir, tiny_checkpoint, tmp_path / "worker2.log", env)
            job = poll_job(client, job_id, timeout_s=420)
            assert job["state"] == "succeeded", (job, second.log())
            assert job["attempts"] == 2
            collection = client.get(f"/jobs/{job_id}/geojson").json()
            assert check_qupath_geojson(collection, width, height) >= 1
            for name in ("stats", "mask", "overlay", "provenance"):
                assert client.get(f"/jobs/{job_id}/{name}").status_code == 200
            time.sleep(3)
    finally:
        first.kill_group()
        if second is not None:
            second.stop()
        hook.close()
    succeeded = [json.loads(body) for _, body in hook.received if json.loads(body)["state"] == "succeeded"]
    assert len(succeeded) == 1, hook.received  # finished exactly once
    work_dirs = [p.name for p in (data_dir / "jobs" / job_id).iterdir()]
    assert work_dirs == ["results"], work_dirs  # the killed attempt's partial output is gone


def test_api_restart_with_redis_loses_nothing(
    tmp_path: Path, tiny_checkpoint: Path, shared_data: Path, redis_env: dict[str, str]
) -> None:
    """Jobs queued while no worker runs survive an API restart and run when a worker comes."""
    data_dir = tmp_path / "data"
    slide = (shared_data / SLIDE).read_bytes()
    with api_client(data_dir, tiny_checkpoint, tmp_path / "api1.log", **redis_env) as client:
        job_id = client.post("/segment", files={"file": ("a.svs", slide)}).json()["job_id"]
        assert client.get(f"/jobs/{job_id}").json()["state"] == "queued"
        assert client.get("/readyz").status_code == 503  # no worker yet
    worker = start_worker(data_dir, tiny_checkpoint, tmp_path / "worker.log", redis_env)
    try:
        with api_client(data_dir, tiny_checkpoint, tmp_path / "api2.log", **redis_env) as client:
            job = poll_job(client, job_id)
            assert job["state"] == "succeeded", worker.log()
            geojson = client.get(f"/jobs/{job_id}/geojson").content
        with api_client(data_dir, tiny_checkpoint, tmp_path / "api3.log", **redis_env) as client:
            assert client.get(f"/jobs/{job_id}").json()["state"] == "succeeded"
            assert client.get(f"/jobs/{job_id}/geojson").content == geojson
            assert [j["job_id"] for j in client.get("/jobs").json()["jobs"]] == [job_id]
    finally:
        worker.stop()
