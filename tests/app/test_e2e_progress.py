"""Issue 22, item 9, on a real ``fprotoseg serve`` (embedded worker, SQLite): progress that moves
with the tiles while the network runs, and a cancel whose answer says what will happen.

Batches of 60 tiles make each forward pass of the tiny network last seconds on a CPU, so a LIMS
polling every 50 ms sees what a slow real model shows on a large slide."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.app.live import api_client, poll_job, wait_ready, write_mosaic_slide

SLIDE = "slides/CMU-1-Small-Region.svs"
BATCH = 60


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path):
    data_dir = tmp_path_factory.mktemp("progress-data")
    log = tmp_path_factory.mktemp("progress-logs") / "serve.log"
    env = {
        "FPROTOSEG_BATCH_SIZE": str(BATCH),
        "FPROTOSEG_CANCEL_POLL_INTERVAL_S": "0.2",
        "FPROTOSEG_MIN_FREE_MB": "0",
    }
    with api_client(data_dir, tiny_checkpoint, log, **env) as client:
        wait_ready(client)
        yield client


def test_progress_moves_with_each_batch_of_tiles(service: httpx.Client, shared_data: Path, tmp_path: Path):
    """168 tiles in 3 batches: while each batch computes, the tiles of the batches before it are
    counted (before, a batch was counted only once the next one had been computed, so a 2-batch
    job showed 0.05 for its whole inference)."""
    mosaic = tmp_path / "mosaic.tif"
    write_mosaic_slide(shared_data / SLIDE, mosaic, (2, 2))
    with mosaic.open("rb") as fh:
        job_id = service.post("/segment", files={"file": ("mosaic.tif", fh)}).json()["job_id"]
    seen: Counter[float] = Counter()
    order: list[float] = []
    job: dict = {}
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        job = service.get(f"/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            break
        if job["stage"] == "inference":
            seen[job["progress"]] += 1
            order.append(job["progress"])
        time.sleep(0.05)
    assert job["state"] == "succeeded" and job["progress"] == 1.0, job
    batches = -(-job["tiles"] // BATCH)
    assert batches >= 3, job["tiles"]
    assert order == sorted(order), "progress went backwards"
    held = sorted(p for p, polls in seen.items() if polls >= 2)  # each shown while a batch computed
    assert len(held) >= batches, f"{batches} batches, progress held during inference: {dict(seen)}"


def _one_batch_slide(shared_data: Path, out: Path) -> bytes:
    """A 600x600 px crop of the real slide at its 0.499 µm/px: a few 224 px tiles, one batch."""
    import numpy as np
    import tifffile

    with tifffile.TiffFile(shared_data / SLIDE) as tif:
        pixels = tif.pages[0].asarray()[1200:1800, 800:1400, :3]
    px_per_cm = 1e4 / 0.499
    tifffile.imwrite(
        out,
        np.ascontiguousarray(pixels),
        photometric="rgb",
        tile=(256, 256),
        resolution=(px_per_cm, px_per_cm),
        resolutionunit="CENTIMETER",
    )
    return out.read_bytes()


def test_a_cancel_says_whether_it_will_stop_the_job(service: httpx.Client, shared_data: Path, tmp_path: Path):
    """DELETE of a one-batch job after its only batch (past the batch loop's cancel check). The
    answer says whether the job can still be stopped (``cancellable``); the job then ends as the
    answer said. Before, the answer said ``cancel_requested: true`` and the job succeeded."""
    slide = _one_batch_slide(shared_data, tmp_path / "crop.tif")
    outcomes: list[tuple[str, bool, str]] = []
    for attempt in range(8):
        r = service.post("/segment", files={"file": (f"crop-{attempt}.tif", slide + str(attempt).encode())})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        assert r.json()["job"]["cancellable"] is True  # queued
        deadline = time.monotonic() + 120
        job = service.get(f"/jobs/{job_id}").json()
        while job["state"] == "queued" or (job["state"] == "running" and job["progress"] < 0.9):
            assert time.monotonic() < deadline, job
            time.sleep(0.01)
            job = service.get(f"/jobs/{job_id}").json()
        r = service.delete(f"/jobs/{job_id}")
        if r.status_code == 409:  # it finished before the DELETE: try again
            continue
        assert r.status_code == 202, r.text
        answer = r.json()
        assert answer["cancel_requested"] is True
        final = poll_job(service, job_id, timeout_s=60)
        outcomes.append((answer["stage"], answer["cancellable"], final["state"]))
        assert final["state"] == ("cancelled" if answer["cancellable"] else "succeeded"), outcomes
        assert final["cancellable"] is False
    assert any(cancellable for _, cancellable, _ in outcomes), f"no DELETE landed in time: {outcomes}"
