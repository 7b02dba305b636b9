"""DICOM WSI in, on a real server: a shared slide converted to a DICOM WSI series (wsidicomizer,
JPEG 2000 lossless, so the pixels are the slide's own), sent as a zip upload and named as a folder
by reference; both give exactly the result of the original slide. Hostile zips (a bomb, ``../`` and
absolute entries, no DICOM inside) are refused with a clear 4xx that leaves nothing behind."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.app.live import api_client, poll_job, wait_ready

SLIDE = "slides/CMU-1-Small-Region.svs"


@pytest.fixture(scope="module")
def series(dicom_series: Path) -> Path:
    return dicom_series


def _zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, series: Path):
    data_dir = tmp_path_factory.mktemp("dicom-data")
    log = tmp_path_factory.mktemp("dicom-logs") / "serve.log"
    env = {
        "FPROTOSEG_SLIDE_ROOTS": str(series.parent),
        "FPROTOSEG_DICOM_ZIP_MAX_MB": "64",
        "FPROTOSEG_BATCH_SIZE": "4",
        "FPROTOSEG_MIN_FREE_MB": "0",
    }
    with api_client(data_dir, tiny_checkpoint, log, **env) as client:
        wait_ready(client)
        yield client, data_dir


def _result(
    client: httpx.Client, response: httpx.Response
) -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
    import tifffile

    assert response.status_code == 202, response.text
    job = poll_job(client, response.json()["job_id"])
    assert job["state"] == "succeeded", job
    mask = tifffile.imread(io.BytesIO(client.get(job["links"]["mask"]).content))
    return job, mask, client.get(job["links"]["stats"]).json()


def test_dicom_zip_and_folder_give_the_result_of_the_original_slide(server, series: Path, shared_data: Path):
    client, data_dir = server
    original = client.post(
        "/segment", files={"file": ("CMU-1-Small-Region.svs", (shared_data / SLIDE).read_bytes())}
    )
    _, want_mask, want_stats = _result(client, original)

    archive = _zip(
        {f"CMU-1/{p.name}": p.read_bytes() for p in sorted(series.glob("*.dcm"))}, zipfile.ZIP_STORED
    )
    zipped_job, zipped_mask, zipped_stats = _result(
        client, client.post("/segment", files={"file": ("CMU-1 series.zip", archive)})
    )
    assert zipped_job["upload"]["format"] == "dicom" and zipped_job["upload"]["size_bytes"] == len(archive)

    uri = "file://" + str(series).replace(" ", "%20")
    folder_job, folder_mask, folder_stats = _result(client, client.post("/segment", json={"slide_uri": uri}))
    assert folder_job["upload"]["format"] == "dicom" and folder_job["upload"]["slide_uri"] == uri

    for mask, stats in ((zipped_mask, zipped_stats), (folder_mask, folder_stats)):
        assert np.array_equal(mask, want_mask)
        assert [(c["name"], c["pixel_count"], c["region_count"]) for c in stats["classes"]] == [
            (c["name"], c["pixel_count"], c["region_count"]) for c in want_stats["classes"]
        ]
        assert stats["slide"]["width"] == want_stats["slide"]["width"] and stats["slide"][
            "mpp"
        ] == pytest.approx(want_stats["slide"]["mpp"])
    assert (
        client.get(
            folder_job["links"]["view"].split("?")[0],
            params={"token": folder_job["links"]["view"].split("token=")[1]},
        ).status_code
        == 200
    )
    # the unpacked series is the job's own copy: one folder per zip job, no temp left
    left = sorted(p.name for p in (data_dir / "uploads").iterdir())
    assert f"{zipped_job['job_id']}.dicom" in left and not any(n.startswith(".incoming") for n in left)
    assert series.is_dir() and list(series.glob("*.dcm"))  # the referenced folder is untouched


def _bomb() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("series/0001.dcm", "w") as fh:
        block = b"\0" * (1 << 20)
        for _ in range(48):  # 48 MiB of zeros in about 50 KB
            fh.write(block)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (_bomb, 413, "zip_too_large"),
        (lambda: _zip({"../evil.dcm": b"\0" * 128 + b"DICM" + b"\0" * 64}), 422, "unsafe_zip"),
        (lambda: _zip({"series/../../evil.dcm": b"x"}), 422, "unsafe_zip"),
        (lambda: _zip({"/tmp/evil.dcm": b"x"}), 422, "unsafe_zip"),
        (lambda: _zip({"C:\\evil.dcm": b"x"}), 422, "unsafe_zip"),
        (lambda: _zip({"readme.txt": b"no dicom here"}), 415, "unsupported_format"),
        (lambda: b"PK\x03\x04" + b"\0" * 100, 422, "unsafe_zip"),  # truncated
    ],
)
def test_hostile_zips_are_refused_and_leave_nothing(
    server, tmp_path: Path, make, status: int, code: str
) -> None:
    client, data_dir = server
    before = sorted(p.name for p in (data_dir / "uploads").iterdir())
    jobs_before = client.get("/jobs").json()["total"]
    r = client.post("/segment", files={"file": ("series.zip", make())})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json" and r.json()["code"] == code
    assert sorted(p.name for p in (data_dir / "uploads").iterdir()) == before
    assert client.get("/jobs").json()["total"] == jobs_before
    assert not (data_dir / "evil.dcm").exists() and not Path("/tmp/evil.dcm").exists()
