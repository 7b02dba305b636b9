"""Slides by reference on a real server: a path under FPROTOSEG_SLIDE_ROOTS (read in place, never
deleted), an ``s3://`` object on a real S3 API (moto's server mode on 127.0.0.1) fetched within a
size cap, both sniffed, hashed and replayed like uploads; every path trick, a missing object and an
object over the cap refused with a 4xx that leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app.live import api_client, free_port, poll_job, wait_ready

SLIDE = "slides/CMU-1-Small-Region.svs"
S3_CAP_MB = 2.5  # the slide is 1.85 MiB; the "big" object is 3 MiB
BUCKET = "lab-slides"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory: pytest.TempPathFactory, shared_data: Path):
    """moto's S3 server on 127.0.0.1 with the slide and an object over the cap in a bucket."""
    import boto3

    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **AWS_ENV},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url, timeout=2)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("moto server did not start") from None
                time.sleep(0.3)
        s3 = boto3.client(
            "s3",
            endpoint_url=url,
            **{"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"},
        )
        s3.create_bucket(Bucket=BUCKET)
        s3.put_object(
            Bucket=BUCKET, Key="cases/CMU-1-Small-Region.svs", Body=(shared_data / SLIDE).read_bytes()
        )
        s3.put_object(Bucket=BUCKET, Key="cases/big.svs", Body=b"\0" * (3 * 2**20))
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Path]:
    """A slide root with a slide, a folder and a symlink out of it; a slide outside every root."""
    base = tmp_path_factory.mktemp("share")
    root = base / "root"
    (root / "case 1").mkdir(parents=True)
    shutil.copy(shared_data / SLIDE, root / "case 1" / "CMU-1-Small-Region.svs")
    outside = base / "outside"
    outside.mkdir()
    shutil.copy(shared_data / SLIDE, outside / "secret.svs")
    (root / "escape.svs").symlink_to(outside / "secret.svs")
    (root / "escape-dir").symlink_to(outside)
    return {"root": root, "outside": outside}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, roots, moto_url: str):
    data_dir = tmp_path_factory.mktemp("ref-data")
    log = tmp_path_factory.mktemp("ref-logs") / "serve.log"
    env = {
        **AWS_ENV,
        "FPROTOSEG_SLIDE_ROOTS": str(roots["root"]),
        "FPROTOSEG_S3_ENDPOINT_URL": moto_url,
        "FPROTOSEG_SLIDE_CACHE_MAX_MB": str(S3_CAP_MB),
        "FPROTOSEG_KEEP_UPLOADS": "false",  # must never touch a slide read by path
        "FPROTOSEG_BATCH_SIZE": "4",
        "FPROTOSEG_MIN_FREE_MB": "0",
    }
    with api_client(data_dir, tiny_checkpoint, log, **env) as client:
        wait_ready(client)
        yield client, data_dir


def _leftovers(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "uploads").iterdir())


def _post(client: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return client.post("/segment", json=body)


def test_slide_by_path_is_read_in_place_and_replayed(server, roots, shared_data: Path) -> None:
    client, data_dir = server
    path = roots["root"] / "case 1" / "CMU-1-Small-Region.svs"
    uri = "file://" + str(path).replace(" ", "%20")
    r = _post(client, {"slide_uri": uri, "external_id": "CASE-1"})
    assert r.status_code == 202, r.text
    job = poll_job(client, r.json()["job_id"])
    assert job["state"] == "succeeded", job
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert job["upload"] == {
        "filename": "CMU-1-Small-Region.svs",
        "sha256": sha,
        "size_bytes": path.stat().st_size,
        "format": "aperio-svs",
        "slide_uri": uri,
    }
    assert client.get(job["links"]["provenance"]).json()["slide"]["sha256"] == sha
    assert path.is_file()  # FPROTOSEG_KEEP_UPLOADS=false deletes only the service's own copies
    assert _leftovers(data_dir) == []  # nothing copied
    again = _post(client, {"slide_uri": uri, "external_id": "CASE-1"})
    assert again.json()["job_id"] == job["job_id"] and again.headers["idempotent-replayed"] == "true"


@pytest.mark.parametrize(
    ("make_uri", "status", "code"),
    [
        (lambda r: f"file://{r['root']}/../outside/secret.svs", 403, "slide_path_forbidden"),
        (lambda r: f"file://{r['root']}/%2e%2e/outside/secret.svs", 403, "slide_path_forbidden"),
        (lambda r: f"file://{r['root']}/%252e%252e/outside/secret.svs", 422, "invalid_slide_uri"),
        (lambda r: f"file://{r['root']}/..%2foutside%2fsecret.svs", 403, "slide_path_forbidden"),
        (lambda r: f"file://{r['root']}/escape.svs", 403, "slide_path_forbidden"),  # symlink out
        (lambda r: f"file://{r['root']}/escape-dir/secret.svs", 403, "slide_path_forbidden"),
        (lambda r: f"file://{r['outside']}/secret.svs", 403, "slide_path_forbidden"),  # absolute outside
        (lambda r: "file:///etc/passwd", 403, "slide_path_forbidden"),
        (
            lambda r: f"file://evil.example{r['root']}/case%201/CMU-1-Small-Region.svs",
            422,
            "invalid_slide_uri",
        ),
        (lambda r: f"file://{r['root']}/case%201/missing.svs", 404, "slide_not_found"),
        (lambda r: f"file://{r['root']}/case%201/CMU-1-Small-Region.svs%00.txt", 422, "invalid_slide_uri"),
        (lambda r: f"file://{r['root']}/case%201", 415, "unsupported_format"),  # a folder, not a slide
        (lambda r: "http://127.0.0.1/slide.svs", 422, "invalid_slide_uri"),
        (lambda r: "s3://lab-slides/cases/missing.svs", 404, "slide_not_found"),
        (lambda r: "s3://lab-slides/cases/big.svs", 413, "slide_too_large_for_cache"),
    ],
)
def test_refused_references_leave_nothing_behind(server, roots, make_uri, status: int, code: str) -> None:
    client, data_dir = server
    before_jobs = client.get("/jobs").json()["total"]
    r = _post(client, {"slide_uri": make_uri(roots)})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json" and r.json()["code"] == code
    assert str(roots["outside"]) not in r.text  # never echoes a server path
    assert _leftovers(data_dir) == [] and client.get("/jobs").json()["total"] == before_jobs


def test_bad_json_bodies_are_4xx(server) -> None:
    client, _ = server
    assert (
        client.post("/segment", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    )
    assert _post(client, {"slide_uri": "s3://b/k", "bogus": 1}).status_code == 422
    assert _post(client, {"mpp": 0.5}).status_code == 422
    assert _post(client, {"slide_uri": "s3://b/k", "metadata": [1]}).status_code == 422
    for field, bad in (("mpp", "0.5"), ("mpp", True), ("external_id", 7), ("model", 1), ("callback_url", [])):
        r = _post(client, {"slide_uri": "s3://b/k", field: bad})
        assert r.status_code == 422 and field in r.json()["detail"], (field, r.text)


def test_slide_by_s3_uri_is_fetched_hashed_and_replayed(server, shared_data: Path) -> None:
    client, data_dir = server
    uri = f"s3://{BUCKET}/cases/CMU-1-Small-Region.svs"
    r = _post(client, {"slide_uri": uri, "mpp": 0.499})
    assert r.status_code == 202, r.text
    job = poll_job(client, r.json()["job_id"])
    assert job["state"] == "succeeded", job
    sha = hashlib.sha256((shared_data / SLIDE).read_bytes()).hexdigest()
    assert job["upload"]["sha256"] == sha and job["upload"]["slide_uri"] == uri and job["mpp"] == 0.499
    assert client.get(job["links"]["provenance"]).json()["slide"]["sha256"] == sha
    assert _leftovers(data_dir) == []  # the fetched copy is the job's own: KEEP_UPLOADS=false removed it
    again = _post(client, {"slide_uri": uri, "mpp": 0.499})
    assert again.json()["job_id"] == job["job_id"] and again.headers["idempotent-replayed"] == "true"
