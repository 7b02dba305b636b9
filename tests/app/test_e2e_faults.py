"""No stuck jobs, with real faults: a Redis killed by its PID (and restarted from its AOF), a Celery
worker killed by its PID, a tiny tmpfs that fills up. Each job reaches a final state within
minutes and a resubmission succeeds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.app.live import api_client, free_port, poll_job, redis_available, wait_ready, write_mosaic_slide
from tests.app.test_e2e_celery import start_worker
from tests.app.test_e2e_embedded import SLIDE

FAST_REAPER = {
    "FPROTOSEG_JOB_HEARTBEAT_INTERVAL_S": "1",
    "FPROTOSEG_JOB_HEARTBEAT_TIMEOUT_S": "6",
    "FPROTOSEG_MAINTENANCE_INTERVAL_S": "1",
    "FPROTOSEG_MIN_FREE_MB": "0",
    "FPROTOSEG_BATCH_SIZE": "4",
}


class OwnRedis:
    """A private redis-server (AOF on, fsync always) on a free port; killed and restarted by PID."""

    def __init__(self, work_dir: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("no redis-server binary")
        self.exe, self.dir, self.port = exe, work_dir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            if redis_available(self.url):
                return
            time.sleep(0.1)
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)  # this test's own redis, by its PID
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def _wait_running(client: httpx.Client, job_id: str, min_progress: float = 0.07) -> dict:
    deadline = time.monotonic() + 180
    job: dict = {}
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}").json()
        if job["state"] == "running" and job["progress"] >= min_progress:
            return job
        assert job["state"] in ("queued", "running"), job
        time.sleep(0.1)
    raise AssertionError(f"job never ran: {job}")


def _get_job(client: httpx.Client, job_id: str) -> dict:
    """GET that tolerates the API's own broker outage (503) while Redis is down."""
    r = client.get(f"/jobs/{job_id}")
    return r.json() if r.status_code == 200 else {"state": "unknown", "status": r.status_code}


@pytest.mark.slow
def test_redis_killed_mid_job_then_restarted(
    tmp_path: Path, tiny_checkpoint: Path, shared_data: Path
) -> None:
    redis = OwnRedis(tmp_path)
    redis.start()
    slide = tmp_path / "mosaic.tif"
    write_mosaic_slide(shared_data / SLIDE, slide, (3, 3))
    env = {**FAST_REAPER, "FPROTOSEG_BROKER_URL": redis.url}
    data_dir = tmp_path / "data"
    worker = start_worker(data_dir, tiny_checkpoint, tmp_path / "worker.log", env)
    try:
        with api_client(data_dir, tiny_checkpoint, tmp_path / "api.log", **env) as client:
            wait_ready(client)
            job_id = client.post("/segment", files={"file": ("m.tif", slide.read_bytes())}).json()["job_id"]
            _wait_running(client, job_id)
            redis.kill()
            down = client.get(f"/jobs/{job_id}")
            assert down.status_code == 503 and down.json()["code"] == "jobstore_unavailable"
            assert down.headers["retry-after"]
            time.sleep(3)
            redis.start()  # same port and dir: the AOF brings the job record back
            started = time.monotonic()
            deadline = started + 240
            job = {"state": "unknown"}
            while time.monotonic() < deadline and job["state"] not in ("succeeded", "failed", "cancelled"):
                job = _get_job(client, job_id)
                time.sleep(0.5)
            assert job["state"] in ("succeeded", "failed"), (job, worker.log())
            if job["state"] == "failed":
                assert job["error"]["code"] in ("worker_lost", "transient_error"), job
            print(f"after the Redis restart: {job['state']} in {time.monotonic() - started:.0f} s")
            # a new submission (a fresh Idempotency-Key) makes a new job that succeeds
            again = client.post(
                "/segment",
                files={"file": ("s.svs", (shared_data / SLIDE).read_bytes())},
                headers={"Idempotency-Key": "after-redis-restart"},
            )
            assert again.status_code == 202 and again.json()["job_id"] != job_id
            assert poll_job(client, again.json()["job_id"], timeout_s=240)["state"] == "succeeded"
    finally:
        worker.kill_group()
        redis.stop()


@pytest.mark.slow
def test_worker_killed_by_pid_job_requeued_delete_ends_a_lost_job(
    tmp_path: Path, tiny_checkpoint: Path, shared_data: Path
) -> None:
    redis = OwnRedis(tmp_path)
    redis.start()
    slide = tmp_path / "mosaic.tif"
    write_mosaic_slide(shared_data / SLIDE, slide, (3, 3))
    env = {**FAST_REAPER, "FPROTOSEG_BROKER_URL": redis.url}
    data_dir = tmp_path / "data"
    worker = start_worker(data_dir, tiny_checkpoint, tmp_path / "w1.log", env)
    second = None
    try:
        with api_client(data_dir, tiny_checkpoint, tmp_path / "api.log", **env) as client:
            wait_ready(client)
            body = slide.read_bytes()
            job_id = client.post("/segment", files={"file": ("m.tif", body)}).json()["job_id"]
            _wait_running(client, job_id)
            worker.kill_group()  # SIGKILL by PID: main process and pool child
            killed_at = time.monotonic()
            deadline = killed_at + 60
            job = {}
            while time.monotonic() < deadline:
                job = client.get(f"/jobs/{job_id}").json()
                if job["state"] == "queued":
                    break
                time.sleep(0.3)
            assert job["state"] == "queued" and job["stage"].startswith("requeued"), job
            print(f"requeued {time.monotonic() - killed_at:.1f} s after the kill (visibility timeout: 5 h)")
            # no worker: the replay of the same upload returns the queued job (it can still finish)
            replay = client.post("/segment", files={"file": ("m.tif", body)})
            assert replay.json()["job_id"] == job_id
            assert client.delete(f"/jobs/{job_id}").json()["state"] == "cancelled"
            # a cancelled job is not replayed: the same upload makes a new job, which a new worker runs
            fresh = client.post("/segment", files={"file": ("m.tif", body)})
            assert fresh.status_code == 202 and fresh.json()["job_id"] != job_id
            second = start_worker(data_dir, tiny_checkpoint, tmp_path / "w2.log", env)
            _wait_running(client, fresh.json()["job_id"])
            second.kill_group()
            # DELETE of a running job whose worker is gone ends it now (nobody would see the flag)
            time.sleep(7)
            r = client.delete(f"/jobs/{fresh.json()['job_id']}")
            assert r.status_code == 202 and r.json()["state"] in ("cancelled", "queued"), r.json()
            assert poll_job(client, fresh.json()["job_id"], timeout_s=30)["state"] == "cancelled"
    finally:
        worker.kill_group()
        if second is not None:
            second.kill_group()
        redis.stop()


@contextmanager
def tiny_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=False
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# What fills the disk first: the job's results, or (a progress write per tile, as a slow machine
# writes more heartbeats) the job store's write-ahead log, which took the last space and then
# refused every write: the job stayed `running` at 0.99 in `vectorise` (issue 22, item 8).
DISK_FILLERS = {
    "results": {},
    "job-store": {"FPROTOSEG_PROGRESS_INTERVAL_S": "0", "FPROTOSEG_BATCH_SIZE": "1"},
}


@pytest.mark.slow
@pytest.mark.parametrize("filler", sorted(DISK_FILLERS))
def test_a_disk_that_fills_up(tmp_path: Path, tiny_checkpoint: Path, shared_data: Path, filler: str) -> None:
    """Uploads on a full disk get 507 and leave nothing; a job whose disk fills up ends failed with
    ``disk_full`` in its first attempt (the worker ends it, not the reaper after lost attempts),
    whatever the machine's load; a resubmission succeeds once there is space."""
    slide = (shared_data / SLIDE).read_bytes()
    with tiny_tmpfs(tmp_path / "small", "2600k") as data_dir:
        env = {**FAST_REAPER, "FPROTOSEG_KEEP_UPLOADS": "false", **DISK_FILLERS[filler]}
        with api_client(data_dir, tiny_checkpoint, tmp_path / "api.log", **env) as client:
            wait_ready(client)
            first = client.post("/segment", files={"file": ("a.svs", slide)})
            assert first.status_code == 202, first.text
            second = client.post("/segment", files={"file": ("b.svs", slide + b"x")})  # no room for it
            assert second.status_code == 507 and second.json()["code"] == "insufficient_storage", second.text
            assert second.headers["retry-after"]
            assert [p.name for p in (data_dir / "uploads").iterdir()] == [f"{first.json()['job_id']}.svs"]
            # waits on the job's state only: the deadline is a bound, not a sleep
            job = poll_job(client, first.json()["job_id"], timeout_s=300)
            print(f"job on a full disk: {job['state']} {job['error']}")
            assert job["state"] == "failed" and job["error"]["code"] == "disk_full", job
            assert job["attempts"] == 1, job
            assert "Traceback" not in (tmp_path / "api.log").read_text()
            subprocess.run(["mount", "-o", "remount,size=64m", str(data_dir)], check=True)  # space is back
            again = client.post("/segment", files={"file": ("a.svs", slide)})
            assert again.status_code == 202
            assert poll_job(client, again.json()["job_id"], timeout_s=300)["state"] == "succeeded"
