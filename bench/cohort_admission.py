"""Time ``POST /cohorts`` admitting a large cohort, on the SQLite store and on the Redis store.

    python bench/cohort_admission.py                       # 1,000 entries, both stores
    python bench/cohort_admission.py --entries 500 --store sqlite

Starts its own ``fprotoseg serve`` per store (no worker: only admission is measured; on Redis the
Celery dispatcher sends to a queue no worker reads, removed afterwards with every key of the run's
prefix). The cohort names the real slides in ../shared/data/slides by file:// URI, round robin,
each entry a distinct case (its own external_id), so every entry is a new job: the worst case for
admission. The same body is then posted again (every slide found again: deduplication). Prints
one JSON line per store; asserts nothing (timings depend on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
SLIDES = REPO.parent / "shared" / "data" / "slides"
COHORT_SLIDES = (
    "CMU-1-Small-Region.svs",
    "OS-1-detail.ome.tif",
    "TCGA-CR-7395-01A-01-TS1.svs",
    "test3-DAPI-2-387.ndpi",
)
API_KEY = "bench-cohort-key-0123456789"
MAX_ENTRIES = 1000


def cohort_body(entries: int, slides_dir: Path) -> dict[str, Any]:
    slides = []
    for i in range(entries):
        name = COHORT_SLIDES[i % len(COHORT_SLIDES)]
        slides.append({"slide_uri": f"file://{slides_dir / name}", "external_id": f"CASE-{i:04d}"})
    return {"slides": slides}


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_store(store: str, entries: int, redis_url: str) -> dict[str, Any]:
    port = _port()
    prefix = f"fprotoseg-bench-{uuid.uuid4().hex[:10]}:"
    with tempfile.TemporaryDirectory(prefix="cohort-bench-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FPROTOSEG_")}
        env.update(
            FPROTOSEG_DATA_DIR=str(Path(tmp) / "data"),
            FPROTOSEG_API_KEYS=API_KEY,
            FPROTOSEG_SLIDE_ROOTS=str(SLIDES),
            FPROTOSEG_MIN_FREE_MB="0",
            FPROTOSEG_LOG_LEVEL="WARNING",
        )
        if store == "redis":
            env.update(
                FPROTOSEG_BROKER_URL=redis_url,
                FPROTOSEG_REDIS_KEY_PREFIX=prefix,
                FPROTOSEG_QUEUE=prefix + "jobs",
            )
        exe = str(Path(sys.executable).parent / "fprotoseg")
        cmd = [exe, "serve", "--host", "127.0.0.1", "--port", str(port), "--no-worker"]
        log = open(Path(tmp) / "serve.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((Path(tmp) / "serve.log").read_text()[-3000:])
                time.sleep(0.3)
            body = cohort_body(entries, SLIDES)
            timings, jobs = [], []
            with httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=600) as client:
                for _ in range(2):  # new jobs, then the same cohort again (every job found again)
                    t0 = time.perf_counter()
                    r = client.post("/cohorts", json=body)
                    timings.append(time.perf_counter() - t0)
                    if r.status_code != 202:
                        raise RuntimeError(f"{r.status_code}: {r.text[:500]}")
                    jobs.append([j["job_id"] for j in r.json()["jobs"]])
            return {
                "store": store,
                "entries": entries,
                "distinct_jobs": len(set(jobs[0])),
                "first_post_s": round(timings[0], 3),
                "repeat_post_s": round(timings[1], 3),
                "same_jobs_on_repeat": jobs[0] == jobs[1],
            }
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
            if store == "redis":
                import redis

                client = redis.Redis.from_url(redis_url)
                keys = list(client.scan_iter(match=prefix + "*", count=1000))
                for i in range(0, len(keys), 500):
                    client.delete(*keys[i : i + 500])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=MAX_ENTRIES)
    ap.add_argument("--store", choices=("sqlite", "redis", "both"), default="both")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    args = ap.parse_args()
    if not 1 <= args.entries <= MAX_ENTRIES:
        ap.error(f"--entries must be 1..{MAX_ENTRIES}")
    for store in ("sqlite", "redis") if args.store == "both" else (args.store,):
        print(json.dumps(run_store(store, args.entries, args.redis_url)), flush=True)


if __name__ == "__main__":
    main()
