"""Issue 24, item 1: cohorts on a real ``fprotoseg serve`` (uvicorn + the embedded worker, SQLite)
over real HTTP, slides named by file:// URI: real slides from ../shared/data/slides, one written
here with tifffile, a truncated one and a missing one (the failures). One callback per cohort,
signed; tenancy like jobs; DELETE cancels what has not started.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.app.live import (
    API_KEY,
    CallbackRecorder,
    api_client,
    redis_url_for_tests,
    wait_ready,
    write_mosaic_slide,
)
from tests.app.test_e2e_celery import start_worker

OTHER_KEY = "other-lab-key-0123456789"


def _uri(path: Path) -> str:
    return "file://" + str(path).replace(" ", "%20")


def poll_cohort(client: httpx.Client, cohort_id: str, timeout_s: float = 300.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = client.get(f"/cohorts/{cohort_id}")
        assert r.status_code == 200, r.text
        view = r.json()
        if view["state"] == "ended":
            return view
        assert r.headers["retry-after"]
        time.sleep(0.5)
    raise AssertionError(f"cohort {cohort_id} still running after {timeout_s} s: {view}")


def wait_callbacks(hook: CallbackRecorder, n: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(hook.received) < n and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> dict[str, Path]:
    own = tmp_path_factory.mktemp("slide-root")
    source = shared_data / "slides" / "CMU-1-Small-Region.svs"
    write_mosaic_slide(source, own / "mosaic.tiff", (1, 2))  # tifffile-written, 2 x CMU-1's tissue
    (own / "truncated.svs").write_bytes(source.read_bytes()[:150_000])
    return {"shared": shared_data / "slides", "own": own}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, roots: dict[str, Path]):
    data_dir = tmp_path_factory.mktemp("cohort-data")
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    env = {
        "FPROTOSEG_API_KEYS": f"lab-a:{API_KEY},lab-b:{OTHER_KEY}",
        "FPROTOSEG_SLIDE_ROOTS": f"{roots['shared']},{roots['own']}",
        "FPROTOSEG_BATCH_SIZE": "8",
        "FPROTOSEG_CALLBACK_ALLOWED_HOSTS": "127.0.0.1",
        "FPROTOSEG_MIN_FREE_MB": "0",
        "FPROTOSEG_CANCEL_POLL_INTERVAL_S": "0.2",
    }
    with api_client(data_dir, tiny_checkpoint, log, **env) as client:
        wait_ready(client)
        yield client, data_dir, log


def test_cohort_end_to_end(service, roots: dict[str, Path]) -> None:
    client, data_dir, _ = service
    hook = CallbackRecorder()
    slides = [
        {"slide_uri": _uri(roots["shared"] / "CMU-1-Small-Region.svs"), "external_id": "S-1"},
        {
            "slide_uri": _uri(roots["shared"] / "OS-1-detail.ome.tif"),
            "external_id": "S-2",
            "metadata": {"block": "A2"},
        },
        {"slide_uri": _uri(roots["own"] / "mosaic.tiff"), "external_id": "S-3"},
        {"slide_uri": _uri(roots["own"] / "truncated.svs"), "external_id": "S-4"},
        {"slide_uri": _uri(roots["own"] / "missing.svs"), "external_id": "S-5"},
    ]
    try:
        r = client.post("/cohorts", json={"slides": slides, "callback_url": hook.url})
        assert r.status_code == 202, r.text
        accepted = r.json()
        assert r.headers["location"] == accepted["status_url"]
        assert [j["external_id"] for j in accepted["jobs"]] == ["S-1", "S-2", "S-3", "S-4", "S-5"]
        assert len({j["job_id"] for j in accepted["jobs"]}) == 5
        cohort = poll_cohort(client, accepted["cohort_id"])
        wait_callbacks(hook, 1)
        time.sleep(3)  # a second callback would come within the sweeper's interval
    finally:
        hook.close()

    states = {j["external_id"]: j for j in cohort["jobs"]}
    assert [states[k]["state"] for k in ("S-1", "S-2", "S-3")] == ["succeeded"] * 3, cohort
    assert states["S-4"]["state"] == "failed" and states["S-4"]["error"]["code"] == "corrupt_slide"
    assert states["S-5"]["state"] == "failed" and states["S-5"]["error"]["code"] == "slide_not_found"
    assert cohort["counts"]["succeeded"] == 3 and cohort["counts"]["failed"] == 2
    assert cohort["ended_at"] and cohort["callback_status"] in ("pending", "delivered")
    # every job is an ordinary job too
    missing_job = client.get(f"/jobs/{states['S-5']['job_id']}").json()
    assert missing_job["state"] == "failed" and missing_job["metadata"] == {"external_id": "S-5"}

    # stats.csv: header + one row per slide, areas as each job's stats.json says
    table = client.get(f"/cohorts/{accepted['cohort_id']}/stats.csv")
    assert table.status_code == 200 and table.headers["content-type"].startswith("text/csv")
    rows = {row["external_id"]: row for row in csv.DictReader(io.StringIO(table.text))}
    assert list(rows) == ["S-1", "S-2", "S-3", "S-4", "S-5"]
    as_json = client.get(f"/cohorts/{accepted['cohort_id']}/stats.json").json()
    assert [s["external_id"] for s in as_json["slides"]] == list(rows)
    for key in ("S-1", "S-2", "S-3"):
        stats = client.get(f"/jobs/{states[key]['job_id']}/stats").json()
        assert float(rows[key]["tissue_area_um2"]) == pytest.approx(stats["tissue_area_um2"], abs=1e-3)
        assert rows[key]["sha256"] and rows[key]["state"] == "succeeded"
        json_slide = next(s for s in as_json["slides"] if s["external_id"] == key)
        # the slide's QC codes, as its stats.json has them (';'-joined in the CSV, a list in JSON)
        assert rows[key]["qc_warnings"] == ";".join(stats["qc"]["codes"])
        assert json_slide["qc_warnings"] == stats["qc"]["codes"]
        for entry in stats["classes"]:
            assert float(rows[key][f"{entry['name']}_area_um2"]) == pytest.approx(
                entry["area_um2"], abs=1e-3
            )
            assert float(rows[key][f"{entry['name']}_fraction"]) == pytest.approx(
                entry["fraction_of_tissue"], abs=1e-6
            )
            assert json_slide["classes"][entry["name"]]["area_um2"] == pytest.approx(entry["area_um2"])
    assert rows["S-4"]["error_code"] == "corrupt_slide" and rows["S-4"]["tissue_area_um2"] == ""
    assert rows["S-4"]["qc_warnings"] == "" and as_json["slides"][3]["qc_warnings"] is None  # not seen
    assert rows["S-5"]["error_code"] == "slide_not_found"
    mosaic = float(rows["S-3"]["tissue_area_um2"]) / float(rows["S-1"]["tissue_area_um2"])
    assert 1.7 < mosaic < 2.3  # the tifffile slide is CMU-1's pixels twice

    # one callback for the whole cohort, signed like a job's
    from fprotoseg.worker.service.callbacks import verify

    ((headers, body),) = hook.received
    secret = (data_dir / "callback-secret").read_text().strip()
    assert verify(secret, headers["X-Fprotoseg-Timestamp"], body, headers["X-Fprotoseg-Signature"])
    payload = json.loads(body)
    assert payload["cohort_id"] == accepted["cohort_id"] and payload["state"] == "ended"
    assert payload["counts"]["succeeded"] == 3 and payload["counts"]["failed"] == 2
    assert payload["links"]["stats_csv"].endswith(f"/cohorts/{accepted['cohort_id']}/stats.csv")
    assert client.get(f"/cohorts/{accepted['cohort_id']}").json()["callback_status"] == "delivered"

    # deduplicated per tenant like single submissions: the same slide, same fields, same job
    single = client.post("/segment", json={"slide_uri": slides[0]["slide_uri"], "external_id": "S-1"})
    assert single.status_code == 202 and single.headers["idempotent-replayed"] == "true"
    assert single.json()["job_id"] == states["S-1"]["job_id"]
    again = client.post("/cohorts", json={"slides": slides[:3] + slides[4:]}).json()
    assert [j["job_id"] for j in again["jobs"][:3]] == [
        states[k]["job_id"] for k in ("S-1", "S-2", "S-3")
    ]
    assert again["jobs"][3]["job_id"] != states["S-5"]["job_id"]  # a failed job is never replayed
    assert poll_cohort(client, again["cohort_id"], 30)["counts"]["succeeded"] == 3

    # another tenant sees nothing: 404 with the registry's code, like a missing cohort
    other = {"X-API-Key": OTHER_KEY}
    for method, path in (
        ("GET", f"/cohorts/{accepted['cohort_id']}"),
        ("GET", f"/cohorts/{accepted['cohort_id']}/stats.csv"),
        ("GET", f"/cohorts/{accepted['cohort_id']}/stats.json"),
        ("DELETE", f"/cohorts/{accepted['cohort_id']}"),
        ("GET", "/cohorts/no-such-cohort"),
    ):
        r = client.request(method, path, headers=other if "no-such" not in path else None)
        assert r.status_code == 404 and r.json()["code"] == "cohort_not_found", (method, path, r.text)
    # the other tenant's own submission of the same slide is its own job
    theirs = client.post("/cohorts", json={"slides": slides[:1]}, headers=other).json()
    assert theirs["jobs"][0]["job_id"] != states["S-1"]["job_id"]


def test_cohort_requests_refused_whole(service, roots: dict[str, Path]) -> None:
    client, _, _ = service
    one = {"slide_uri": _uri(roots["shared"] / "CMU-1-Small-Region.svs")}
    cases = [
        ({"slides": []}, 422, "invalid_request"),
        ({"slides": [one] * 1001}, 422, "invalid_request"),
        ({"slides": [one], "model": "no-such-model"}, 422, "unknown_model"),
        ({"slides": [one], "callback_url": "file:///etc/passwd"}, 422, "invalid_request"),
        ({"slides": [{**one, "colour": "blue"}]}, 422, "invalid_request"),
        ({"slides": [one], "mpp": "0.5"}, 422, "invalid_request"),
    ]
    for body, status, code in cases:
        r = client.post("/cohorts", json=body)
        assert r.status_code == status and r.json()["code"] == code, (
            body if len(str(body)) < 300 else "1001",
            r.text,
        )
    r = client.post("/cohorts", content=b"slides", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    # JSON to Python but not to the LIMS reading it back: refused by the strict parser, as on
    # POST /segment, before any slide is admitted
    uri = json.dumps(one["slide_uri"])
    start = '{"slides": [{"slide_uri": ' + uri
    jobs_before = client.get("/jobs").json()["total"]
    for raw in (
        start + ', "metadata": {"x": NaN}}]}',
        start + ', "metadata": {"x": 1e999}}]}',
        start + ', "external_id": "a", "external_id": "b"}]}',
        start + ', "metadata": {"s": "\\ud800x"}}]}',
    ):
        r = client.post("/cohorts", content=raw.encode(), headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["code"] == "invalid_request", (raw, r.text)
        assert "RFC 8259" in r.json()["detail"], r.text
    assert client.get("/jobs").json()["total"] == jobs_before  # nothing was admitted
    r = client.post("/cohorts", content=b'{"slides": [', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_request", r.text


def test_delete_cancels_what_has_not_started(service, roots: dict[str, Path]) -> None:
    """Four jobs (the same slide for four cases); the one local worker runs one at a time, so a
    DELETE right after the POST finds the later ones queued: those are cancelled, a running one
    finishes, and the cohort ends."""
    client, _, _ = service
    uri = _uri(roots["own"] / "mosaic.tiff")
    slides = [{"slide_uri": uri, "external_id": f"CASE-{i}"} for i in range(4)]
    accepted = client.post("/cohorts", json={"slides": slides}).json()
    r = client.delete(f"/cohorts/{accepted['cohort_id']}")
    assert r.status_code == 202, r.text
    answer = r.json()
    assert answer["cancel_requested"] is True and answer["cancelled"] >= 2
    cohort = poll_cohort(client, accepted["cohort_id"])
    assert cohort["counts"]["cancelled"] == answer["cancelled"]
    assert cohort["counts"]["cancelled"] + cohort["counts"]["succeeded"] == 4
    for job in cohort["jobs"]:
        if job["state"] == "cancelled":
            assert client.get(f"/jobs/{job['job_id']}").json()["state"] == "cancelled"


@pytest.fixture()
def redis_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    with redis_url_for_tests(tmp_path) as (url, prefix):
        yield {
            "FPROTOSEG_BROKER_URL": url,
            "FPROTOSEG_REDIS_KEY_PREFIX": prefix,
            "FPROTOSEG_QUEUE": prefix + "jobs",
            "FPROTOSEG_CALLBACK_ALLOWED_HOSTS": "127.0.0.1",
            "FPROTOSEG_MIN_FREE_MB": "0",
        }


def test_cohort_with_redis_and_celery(
    tmp_path: Path, tiny_checkpoint: Path, roots: dict[str, Path], redis_env: dict[str, str]
) -> None:
    """The same cohort on the Redis job store with a real Celery worker: one good slide, one
    missing; the cohort ends, its table and its one callback come from Redis."""
    data_dir = tmp_path / "data"
    hook = CallbackRecorder()
    env = {**redis_env, "FPROTOSEG_SLIDE_ROOTS": f"{roots['shared']},{roots['own']}"}
    worker = start_worker(data_dir, tiny_checkpoint, tmp_path / "worker.log", env)
    try:
        with api_client(data_dir, tiny_checkpoint, tmp_path / "api.log", **env) as client:
            assert wait_ready(client)["checks"]["mode"] == "celery"
            slides = [
                {"slide_uri": _uri(roots["shared"] / "CMU-1-Small-Region.svs"), "external_id": "R-1"},
                {"slide_uri": _uri(roots["own"] / "missing.svs"), "external_id": "R-2"},
            ]
            r = client.post("/cohorts", json={"slides": slides, "callback_url": hook.url})
            assert r.status_code == 202, r.text
            cohort = poll_cohort(client, r.json()["cohort_id"], 180)
            assert [j["state"] for j in cohort["jobs"]] == ["succeeded", "failed"], worker.log()
            table = client.get(f"/cohorts/{cohort['cohort_id']}/stats.csv").text
            rows = list(csv.DictReader(io.StringIO(table)))
            assert [row["external_id"] for row in rows] == ["R-1", "R-2"]
            assert float(rows[0]["tissue_area_um2"]) > 0 and rows[1]["error_code"] == "slide_not_found"
            wait_callbacks(hook, 1)
            time.sleep(3)
    finally:
        worker.stop()
        hook.close()
    (_, body), = hook.received
    assert json.loads(body)["counts"]["succeeded"] == 1


def test_large_cohort_is_admitted_at_once(service, roots: dict[str, Path]) -> None:
    """1,000 entries naming three real slides five cases each way (TCGA-CR-7395, whose file records
    no µm/px, with its own mpp over the cohort's) and a missing slide every 200th: one request
    answers every entry with its job, in order; one job per distinct slide and fields; a repeat
    finds the same jobs (a failed one is never found again); another tenant gets its own jobs."""
    client, _, _ = service
    names = (
        ("CMU-1-Small-Region.svs", None),
        ("OS-1-detail.ome.tif", None),
        ("TCGA-CR-7395-01A-01-TS1.svs", 0.25),
    )
    slides: list[dict[str, Any]] = []
    for i in range(1000):
        if i % 200 == 199:
            slides.append({"slide_uri": _uri(roots["own"] / f"missing-{i}.svs"), "external_id": f"LOST-{i}"})
            continue
        name, mpp = names[i % 3]
        slides.append({"slide_uri": _uri(roots["shared"] / name), "external_id": f"CASE-{i % 5}"})
        if mpp is not None:
            slides[-1]["mpp"] = mpp
    body = {"slides": slides, "mpp": 0.5}
    cohort_ids = []
    try:
        t0 = time.monotonic()
        r = client.post("/cohorts", json=body, timeout=600)
        first_s = time.monotonic() - t0
        assert r.status_code == 202, r.text
        accepted = r.json()
        cohort_ids.append(accepted["cohort_id"])
        jobs = accepted["jobs"]
        assert [j["external_id"] for j in jobs] == [s["external_id"] for s in slides]
        by_entry: dict[tuple[str, str], set[str]] = {}
        for entry, job in zip(slides, jobs, strict=True):
            by_entry.setdefault((entry["slide_uri"], entry["external_id"]), set()).add(job["job_id"])
        assert all(len(ids) == 1 for ids in by_entry.values())
        assert len({j["job_id"] for j in jobs}) == len(by_entry) == 15 + 5
        view = client.get(f"/cohorts/{accepted['cohort_id']}").json()
        assert len(view["jobs"]) == 1000 and view["counts"]["failed"] >= 5
        lost = client.get(f"/jobs/{jobs[199]['job_id']}").json()
        assert lost["state"] == "failed" and lost["error"]["code"] == "slide_not_found"
        tcga = client.get(f"/jobs/{jobs[2]['job_id']}").json()
        cmu = client.get(f"/jobs/{jobs[0]['job_id']}").json()
        assert (tcga["mpp"], cmu["mpp"]) == (0.25, 0.5)  # the slide's own wins over the cohort's

        again = client.post("/cohorts", json=body, timeout=600)
        assert again.status_code == 202, again.text
        cohort_ids.append(again.json()["cohort_id"])
        for i, (first, second) in enumerate(zip(jobs, again.json()["jobs"], strict=True)):
            assert (first["job_id"] == second["job_id"]) == (i % 200 != 199), i
        theirs = client.post("/cohorts", json=body, headers={"X-API-Key": OTHER_KEY}, timeout=600)
        assert theirs.status_code == 202, theirs.text
        cohort_ids.append(theirs.json()["cohort_id"])
        assert not {j["job_id"] for j in theirs.json()["jobs"]} & {j["job_id"] for j in jobs}
        assert len({j["job_id"] for j in theirs.json()["jobs"]}) == 20
        print(f"1,000-entry cohort admitted in {first_s:.2f} s")
    finally:  # the queued jobs are cancelled, the running one finishes
        for cohort_id, key in zip(cohort_ids, (API_KEY, API_KEY, OTHER_KEY), strict=False):
            client.delete(f"/cohorts/{cohort_id}", headers={"X-API-Key": key})
        for cohort_id, key in zip(cohort_ids, (API_KEY, API_KEY, OTHER_KEY), strict=False):
            client.headers["X-API-Key"] = key
            poll_cohort(client, cohort_id, 300)
        client.headers["X-API-Key"] = API_KEY
