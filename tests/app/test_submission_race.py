"""Issue 22, items 3 and 4: submission is atomic, raced for real.

Concurrent ``POST /segment`` requests to a real ``fprotoseg serve`` (API only: the jobs stay
queued), with the SQLite store (embedded) and with the Redis store (broker): one Idempotency-Key
never answers with the job of another slide (422 ``idempotency_key_reused``), and the same slide
with the same parameters from one tenant makes one job however many requests arrive at once.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile

from tests.app.live import (
    API_KEY,
    Proc,
    fprotoseg_cmd,
    free_port,
    redis_url_for_tests,
    service_env,
    wait_http,
)

CONCURRENT = 16


def _slide(path: Path, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (256, 320, 3), dtype=np.uint8)
    tifffile.imwrite(
        path, pixels, tile=(128, 128), photometric="rgb", resolution=(2e4, 2e4), resolutionunit=3
    )
    return path.read_bytes()


@contextmanager
def _server(tmp_path: Path, checkpoint: Path, backend: str) -> Iterator[str]:
    """``fprotoseg serve --no-worker`` on the SQLite store, or on Redis (API only, Celery)."""
    with ExitStack() as stack:
        extra = {"FPROTOSEG_MIN_FREE_MB": "0"}
        if backend == "redis":
            url, prefix = stack.enter_context(redis_url_for_tests(tmp_path))
            extra |= {
                "FPROTOSEG_BROKER_URL": url,
                "FPROTOSEG_REDIS_KEY_PREFIX": prefix,
                "FPROTOSEG_QUEUE": prefix + "jobs",
            }
        port = free_port()
        env = service_env(tmp_path / "data", checkpoint, **extra)
        cmd = fprotoseg_cmd("serve", "--no-worker", "--host", "127.0.0.1", "--port", str(port))
        proc = Proc(cmd, env, tmp_path / "serve.log")
        stack.callback(proc.stop)
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz", proc, timeout_s=90)
        yield base


def _race(base: str, bodies: list[tuple[bytes, dict[str, str]]]) -> list[httpx.Response]:
    """All requests sent at once (a barrier releases them together), each on its own connection."""
    barrier = threading.Barrier(len(bodies))

    def send(item: tuple[bytes, dict[str, str]]) -> httpx.Response:
        content, headers = item
        with httpx.Client(base_url=base, headers={"X-API-Key": API_KEY, **headers}, timeout=120) as client:
            client.get("/healthz")  # connected before the barrier: the uploads start together
            barrier.wait()
            return client.post("/segment", files={"file": ("s.tif", content)}, data={"mpp": "0.5"})

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def _jobs(base: str) -> list[dict]:  # type: ignore[type-arg]
    r = httpx.get(base + "/jobs", params={"limit": 1000}, headers={"X-API-Key": API_KEY})
    assert r.status_code == 200, r.text
    return list(r.json()["jobs"])


@pytest.fixture(params=["sqlite", "redis"])
def server(request: pytest.FixtureRequest, tmp_path: Path, tiny_checkpoint: Path) -> Iterator[str]:
    with _server(tmp_path, tiny_checkpoint, request.param) as base:
        yield base


def test_one_key_sent_with_different_slides_at_once_never_answers_another_slides_job(
    server: str, tmp_path: Path
) -> None:
    slides = [_slide(tmp_path / f"s{i}.tif", seed=i) for i in range(CONCURRENT)]
    responses = _race(server, [(content, {"Idempotency-Key": "case-4711"}) for content in slides])
    accepted = []
    for content, r in zip(slides, responses, strict=True):
        if r.status_code == 202:
            # whatever won, a 202 is the job of the slide this request sent
            assert r.json()["job"]["upload"]["sha256"] == hashlib.sha256(content).hexdigest()
            accepted.append(r)
        else:
            assert r.status_code == 422 and r.json()["code"] == "idempotency_key_reused", r.text
    assert len(accepted) == 1
    assert [j["job_id"] for j in _jobs(server)] == [accepted[0].json()["job_id"]]


def test_the_same_slide_sent_at_once_makes_one_job(server: str, tmp_path: Path) -> None:
    content = _slide(tmp_path / "same.tif", seed=99)
    without_key = _race(server, [(content, {})] * CONCURRENT)
    refused = [r.text for r in without_key if r.status_code != 202]
    assert not refused, refused
    job_ids = {r.json()["job_id"] for r in without_key}
    assert len(job_ids) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in without_key) == CONCURRENT - 1

    other = _slide(tmp_path / "other.tif", seed=100)
    with_key = _race(server, [(other, {"Idempotency-Key": "case-4712"})] * CONCURRENT)
    assert {r.status_code for r in with_key} == {202}
    assert len({r.json()["job_id"] for r in with_key}) == 1
    assert len(_jobs(server)) == 2


def test_a_cancelled_job_gives_its_slide_back(server: str, tmp_path: Path) -> None:
    """The claim on a slide is the live job's: once it is cancelled, the same slide makes a new job."""
    content = _slide(tmp_path / "again.tif", seed=7)
    first = _race(server, [(content, {})])[0]
    assert first.status_code == 202
    headers = {"X-API-Key": API_KEY}
    assert httpx.delete(f"{server}/jobs/{first.json()['job_id']}", headers=headers).status_code == 202
    second = _race(server, [(content, {})] * 4)
    assert {r.status_code for r in second} == {202}
    assert len({r.json()["job_id"] for r in second} | {first.json()["job_id"]}) == 2
