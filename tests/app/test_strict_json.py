"""Issue 22, items 1, 2 and 6: JSON from a client is RFC 8259 JSON or a 422 before anything is
stored; control characters in client identifiers are refused; records an older version stored
(a lone surrogate, NaN) still list, for the tenant and for the admin."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient

from fprotoseg.app.main import create_app
from fprotoseg.worker.service.jobstore import JobRecord, SqliteJobStore
from fprotoseg.worker.service.settings import Settings

A = {"X-API-Key": "key-a"}
ADMIN = {"X-API-Key": "root-key"}

# Metadata as a form sends it (JSON text): each is accepted by Python's json module, none is JSON.
HOSTILE_METADATA = [
    '{"s": "\\ud800x"}',  # a lone surrogate: stored, then no view or callback could be serialised
    '{"s": "x\\udfff"}',
    '{"n": NaN}',
    '{"n": Infinity}',
    '{"n": -Infinity}',
    '{"n": 1e999}',  # overflows to inf
    '{"n": 9007199254740993}',  # beyond what a receiver's double holds (I-JSON)
    '{"a": 1, "a": 2}',  # one name twice: which one would the LIMS see?
    '{"s": "\\u001b[31mred"}',  # an ANSI escape in a string
    '{"\\u0007bell": 1}',  # a control character in a name
]


@pytest.fixture()
def slide(tmp_path: Path) -> Path:
    path = tmp_path / "roots" / "slide.tif"
    path.parent.mkdir()
    pixels = np.random.default_rng(3).integers(0, 255, (512, 640, 3), dtype=np.uint8)
    tifffile.imwrite(
        path, pixels, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4), resolutionunit=3
    )
    return path


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        api_keys=["lab-a:key-a"],
        admin_keys=["root-key"],
        slide_roots=[tmp_path / "roots"],
        min_free_mb=0,
    )


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(tmp_path)), raise_server_exceptions=False) as c:
        yield c


def _nothing_stored(client: TestClient, settings_dir: Path) -> None:
    for headers in (A, ADMIN):
        listing = client.get("/jobs", headers=headers)
        assert listing.status_code == 200 and listing.json()["total"] == 0
    assert [p.name for p in (settings_dir / "uploads").iterdir()] == []  # no slide left behind


@pytest.mark.parametrize("metadata", HOSTILE_METADATA)
def test_hostile_metadata_in_a_form_is_422_and_nothing_is_stored(
    client: TestClient, slide: Path, tmp_path: Path, metadata: str
) -> None:
    r = client.post(
        "/segment", files={"file": ("s.tif", slide.read_bytes())}, data={"metadata": metadata}, headers=A
    )
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_request" and "metadata" in r.json()["detail"]
    _nothing_stored(client, tmp_path / "data")


@pytest.mark.parametrize("metadata", HOSTILE_METADATA)
def test_hostile_metadata_in_a_json_body_is_422_and_nothing_is_stored(
    client: TestClient, slide: Path, tmp_path: Path, metadata: str
) -> None:
    body = f'{{"slide_uri": "{slide.as_uri()}", "metadata": {metadata}}}'
    r = client.post("/segment", content=body, headers={**A, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_request"
    _nothing_stored(client, tmp_path / "data")


@pytest.mark.parametrize(
    "field", ['"mpp": NaN', '"mpp": 1e999', '"external_id": "\\ud800"', '"model": "\\udc00"']
)
def test_every_field_of_a_json_body_is_strict(
    client: TestClient, slide: Path, tmp_path: Path, field: str
) -> None:
    body = f'{{"slide_uri": "{slide.as_uri()}", {field}}}'
    r = client.post("/segment", content=body, headers={**A, "Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["code"] == "invalid_request", r.text
    _nothing_stored(client, tmp_path / "data")


@pytest.mark.parametrize(
    "external_id", ["CASE\x1b[2J-1", "CASE-1\nFAKE LOG LINE", "C\x00D", "C\x85D", "C\x7fD"]
)
def test_control_characters_in_client_identifiers_are_refused(
    client: TestClient, slide: Path, tmp_path: Path, external_id: str
) -> None:
    form = client.post(
        "/segment",
        files={"file": ("s.tif", slide.read_bytes())},
        data={"external_id": external_id},
        headers=A,
    )
    assert form.status_code == 422 and "external_id" in form.json()["detail"], form.text
    body = json.dumps({"slide_uri": slide.as_uri(), "external_id": external_id})
    ref = client.post("/segment", content=body, headers={**A, "Content-Type": "application/json"})
    assert ref.status_code == 422 and "external_id" in ref.json()["detail"], ref.text
    _nothing_stored(client, tmp_path / "data")


def test_free_text_in_metadata_keeps_its_lines_and_real_unicode(client: TestClient, slide: Path) -> None:
    metadata = {"note": "line 1\nline 2\ttab", "name": "Müller 😀", "n": 9007199254740991, "f": 0.5}
    r = client.post(
        "/segment",
        files={"file": ("s.tif", slide.read_bytes())},
        data={"metadata": json.dumps(metadata)},
        headers=A,
    )
    assert r.status_code == 202, r.text
    assert client.get(f"/jobs/{r.json()['job_id']}", headers=A).json()["metadata"] == metadata


def test_records_an_older_version_stored_still_list(tmp_path: Path) -> None:
    """What the old service stored for the hostile requests above: listed, not a 500 for good."""
    settings = _settings(tmp_path)
    store = SqliteJobStore(settings.sqlite_path)
    bad = {
        "job-surrogate": {"s": "\ud800x"},
        "job-nan": {"n": math.nan, "i": [math.inf, -math.inf]},
    }
    for job_id, metadata in bad.items():
        store.create(JobRecord(id=job_id, tenant="lab-a", metadata=metadata, upload_sha256=job_id))
    store.close()
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        for headers in (A, ADMIN):
            listing = client.get("/jobs", headers=headers)
            assert listing.status_code == 200, listing.text
            assert {j["job_id"] for j in listing.json()["jobs"]} == set(bad)
        one = client.get("/jobs/job-surrogate", headers=A)
        assert one.status_code == 200 and one.json()["metadata"] == {"s": "\ufffdx"}
        nan = client.get("/jobs/job-nan", headers=ADMIN)
        assert nan.status_code == 200 and nan.json()["metadata"] == {"n": None, "i": [None, None]}
        cancelled = client.delete("/jobs/job-nan", headers=A)
        assert cancelled.status_code == 202 and cancelled.json()["state"] == "cancelled"


def test_a_control_character_in_the_idempotency_key_is_refused(
    client: TestClient, slide: Path, tmp_path: Path
) -> None:
    r = client.post(
        "/segment", files={"file": ("s.tif", slide.read_bytes())}, headers={**A, "Idempotency-Key": "k\t1"}
    )
    assert r.status_code == 422 and "Idempotency-Key" in r.json()["detail"], r.text
    _nothing_stored(client, tmp_path / "data")
