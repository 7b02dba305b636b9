"""Issue 22, item 7: a LIMS developer generates a typed Python client from the running server's
``/openapi.json`` with openapi-python-client (the one command docs/service.md gives), the
generator warns about nothing (no download dropped, no bare object), and the client drives a real
slide through upload -> poll -> stats -> mask -> GeoJSON -> provenance against a real
``fprotoseg serve`` (embedded worker, SQLite), every answer parsed into its generated class."""

from __future__ import annotations

import importlib
import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from fprotoseg.app.routes.result_models import FeatureCollectionView, ProvenanceView, StatsView
from tests.app.live import API_KEY, api_server, wait_ready

SLIDE = "slides/CMU-1-Small-Region.svs"
PACKAGE = "fprotoseg_typed_client"  # a name no other test imports


def _generate(spec_path: Path, out_dir: Path) -> str:
    """``openapi-python-client generate`` as docs/service.md gives it; returns what it printed."""
    exe = shutil.which("openapi-python-client", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("openapi-python-client is not installed: pip install -e '.[dev]' (the dev extra has it)")
    # the generator formats its output with ruff: the venv's, found on PATH
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = subprocess.run(
        [exe, "generate", "--path", str(spec_path), "--output-path", str(out_dir), "--meta", "none",
         "--fail-on-warning"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    printed = run.stdout + run.stderr
    assert run.returncode == 0, printed
    return printed


@pytest.fixture()
def typed_client(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[tuple[ModuleType, Any, str]]:
    """(the generated package, its AuthenticatedClient on a live server, the server's URL)."""
    env = {"FPROTOSEG_MIN_FREE_MB": "0", "FPROTOSEG_BATCH_SIZE": "4", "FPROTOSEG_MAX_UPLOAD_MB": "16"}
    with api_server(tmp_path / "data", tiny_checkpoint, tmp_path / "serve.log", **env) as url:
        spec = httpx.get(f"{url}/openapi.json", timeout=30)
        assert spec.status_code == 200
        spec_path = tmp_path / "openapi.json"
        spec_path.write_bytes(spec.content)
        printed = _generate(spec_path, tmp_path / "gen" / PACKAGE)
        assert "warning" not in printed.lower(), printed  # nothing omitted, nothing skipped
        assert "not in PATH" not in printed, printed  # its ruff post-processing ran
        with httpx.Client(base_url=url, timeout=30) as plain:
            wait_ready(plain, timeout_s=400)  # the embedded worker has loaded torch and the model
        sys.path.insert(0, str(tmp_path / "gen"))
        try:
            package = importlib.import_module(PACKAGE)
            client = package.AuthenticatedClient(
                base_url=url,
                token=API_KEY,
                prefix="",
                auth_header_name="X-API-Key",
                timeout=httpx.Timeout(60.0),
            )
            with client:
                yield package, client, url
        finally:
            sys.path.remove(str(tmp_path / "gen"))
            for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
                del sys.modules[name]


def _api(package: ModuleType, path: str) -> Any:
    return importlib.import_module(f"{package.__name__}.api.{path}")


def _poll(package: ModuleType, client: Any, job_id: str, timeout_s: float = 900.0) -> Any:
    """The generated ``get_job`` until the job ends; every answer a JobView with the state enum."""
    models = importlib.import_module(f"{package.__name__}.models")
    get_job = _api(package, "jobs.get_job")
    terminal = {models.JobViewState.SUCCEEDED, models.JobViewState.FAILED, models.JobViewState.CANCELLED}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = get_job.sync(job_id, client=client)
        assert isinstance(job, models.JobView), job
        assert isinstance(job.state, models.JobViewState)
        if job.state in terminal:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end in {timeout_s} s")


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the worker's start and the job are minutes on a loaded 2-core machine
def test_a_generated_client_drives_a_slide_typed_end_to_end(typed_client, shared_data: Path) -> None:
    import numpy as np
    import tifffile

    package, client, url = typed_client
    models = importlib.import_module(f"{package.__name__}.models")
    types = importlib.import_module(f"{package.__name__}.types")
    slide = (shared_data / SLIDE).read_bytes()

    body = models.CreateSegmentationFilesBody(
        file=types.File(payload=io.BytesIO(slide), file_name="CMU-1-Small-Region.svs"),
        external_id="CASE-22",
    )
    accepted = _api(package, "segment.create_segmentation").sync(client=client, body=body)
    assert isinstance(accepted, models.SegmentAccepted), accepted
    assert isinstance(accepted.state, models.SegmentAcceptedState)
    assert isinstance(accepted.job.links, models.JobLinks)
    assert accepted.job.links.self_.endswith(f"/jobs/{accepted.job_id}")
    assert isinstance(accepted.job.links.stats, types.Unset)  # no result link before it succeeded

    job = _poll(package, client, accepted.job_id)
    assert job.state == models.JobViewState.SUCCEEDED, job.error
    assert job.links.stats == f"{url}/jobs/{job.job_id}/stats" and isinstance(job.links.mask, str)

    stats = _api(package, "results.get_stats").sync(job.job_id, client=client)
    assert isinstance(stats, models.StatsView), stats
    assert (stats.slide.width, stats.slide.height) == (2220, 2967)
    assert isinstance(stats.job, models.ResultJob) and stats.job.job_id == job.job_id
    assert stats.job.filename == "CMU-1-Small-Region.svs"
    assert stats.job.metadata.additional_properties == {"external_id": "CASE-22"}
    assert [c.label for c in stats.classes] == list(range(1, len(stats.classes) + 1))
    for cls in stats.classes:
        assert isinstance(cls, models.ClassStats)
        assert isinstance(cls.area_um2, float) and isinstance(cls.pixel_count, int)
        assert cls.area_um2 == pytest.approx(cls.pixel_count * stats.output_mpp**2)
    assert sum(c.area_um2 for c in stats.classes) == pytest.approx(stats.tissue_area_um2)
    assert stats.tissue_area_um2 > 0

    mask = _api(package, "results.get_mask").sync(job.job_id, client=client)
    assert isinstance(mask, types.File), mask
    data = mask.payload.read()
    assert data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00")  # a TIFF (classic or BigTIFF)
    labels = tifffile.imread(io.BytesIO(data))
    counts = np.bincount(labels.ravel(), minlength=len(stats.classes) + 1)
    assert [int(counts[c.label]) for c in stats.classes] == [c.pixel_count for c in stats.classes]

    overlay = _api(package, "results.get_overlay").sync(job.job_id, client=client)
    assert isinstance(overlay, types.File) and overlay.payload.read()[:8] == b"\x89PNG\r\n\x1a\n"

    geojson = _api(package, "results.get_geojson").sync(job.job_id, client=client)
    assert isinstance(geojson, models.FeatureCollectionView), geojson
    assert geojson.features and {f.properties.classification.name for f in geojson.features} <= {
        c.name for c in stats.classes
    }
    for feature in geojson.features:
        assert isinstance(feature.geometry, models.Polygon | models.MultiPolygon)
        assert feature.properties.measurements.area_um2 > 0
    by_class = {c.name: c.region_count for c in stats.classes}
    for name, count in by_class.items():
        assert sum(f.properties.classification.name == name for f in geojson.features) == count

    provenance = _api(package, "results.get_provenance").sync(job.job_id, client=client)
    assert isinstance(provenance, models.ProvenanceView), provenance
    assert provenance.tiles.inferred == job.tiles and provenance.job.model == job.model
    assert provenance.slide.sha256 == job.upload.sha256

    # a missing job is a typed problem, not an exception or a bare dict
    missing = _api(package, "results.get_mask").sync("no-such-job", client=client)
    assert isinstance(missing, models.ProblemView) and missing.code == "job_not_found"

    # The server's own files name every top-level key in the schema's models (the worker writes
    # plain dicts: a key added or renamed there without its model fails here).
    with httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=60) as raw:
        models_by_file = {"stats": StatsView, "provenance": ProvenanceView, "geojson": FeatureCollectionView}
        for name, model in models_by_file.items():
            parsed = model.model_validate_json(raw.get(f"/jobs/{job.job_id}/{name}").content)
            assert not parsed.model_extra, (name, parsed.model_extra)
        # a binary download in the two media types the schema gives it
        assert raw.get(f"/jobs/{job.job_id}/mask").headers["content-type"] == "image/tiff"
        octets = raw.get(f"/jobs/{job.job_id}/mask", headers={"Accept": "application/octet-stream"})
        assert octets.headers["content-type"] == "application/octet-stream" and octets.content == data



def test_the_schema_types_every_download_and_every_link(tmp_path: Path) -> None:
    """What the generator needs, checked in the document (fast, no job): each JSON download names
    its model, each binary one offers the octet-stream generators keep, and ``links`` names every
    result file (a result added to the layout without its link field fails here)."""
    from fastapi.testclient import TestClient

    from fprotoseg.app.main import create_app
    from fprotoseg.app.routes.views import JobLinks
    from fprotoseg.worker.service.settings import Settings
    from fprotoseg.worker.wsi.result_files import MEDIA_TYPES, REQUESTABLE_OUTPUTS, RESULT_FILES

    with TestClient(create_app(Settings(data_dir=tmp_path / "data", api_keys=["k-1"]))) as client:
        spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    typed = {"stats": "StatsView", "provenance": "ProvenanceView", "geojson": "FeatureCollectionView"}
    for name in RESULT_FILES:
        content = spec["paths"][f"/jobs/{{job_id}}/{name}"]["get"]["responses"]["200"]["content"]
        if name in typed:
            assert content == {MEDIA_TYPES[name]: {"schema": {"$ref": f"#/components/schemas/{typed[name]}"}}}
        elif "json" not in MEDIA_TYPES[name]:
            assert list(content) == [MEDIA_TYPES[name], "application/octet-stream"]
    assert schemas["ClassStats"]["properties"]["area_um2"]["type"] == "number"
    geometry = schemas["Feature"]["properties"]["geometry"]
    assert {ref["$ref"].rsplit("/", 1)[1] for ref in geometry["oneOf"]} == {"Polygon", "MultiPolygon"}
    assert schemas["JobView"]["properties"]["links"]["$ref"].endswith("/JobLinks")
    assert set(JobLinks.model_fields) == {"self", "view", *RESULT_FILES, *REQUESTABLE_OUTPUTS}
    assert schemas["JobLinks"]["required"] == ["self"]
    assert all(p["type"] == "string" for p in schemas["JobLinks"]["properties"].values())
