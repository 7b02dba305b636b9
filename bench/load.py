"""Load test of the HTTP API on loopback: concurrent uploads, then a steady rate of status polls.

    python bench/load.py                      # starts its own `fprotoseg serve` (embedded default)
    python bench/load.py --uploads 20 --poll-rate 200 --duration 60

Phase 1 sends ``--uploads`` copies of a real slide at once (each with a few distinct trailing
bytes, so each is a new job; a TIFF ignores bytes after its data), sampling the API process's
RSS every 20 ms. Phase 2 polls ``GET /jobs/{id}`` open-loop at ``--poll-rate`` per second for
``--duration`` seconds while the embedded worker processes the jobs. Prints latency percentiles,
errors and memory; asserts nothing (timings depend on the machine). Bounded: at most 100
uploads, 1000 polls/s, 300 s; loopback addresses only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = REPO.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class RssSampler:
    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        self.pid, self.every_s = pid, every_s
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.samples.append(rss_mib(self.pid))
            await asyncio.sleep(self.every_s)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def upload_phase(
    client: httpx.AsyncClient, slide: bytes, n: int, distinct: bool
) -> tuple[list[str], list[float], int]:
    async def one(i: int) -> tuple[str | None, float]:
        content = slide + (f"fprotoseg-load-{i}-{time.time_ns()}".encode() if distinct else b"")
        t = time.perf_counter()
        try:
            r = await client.post("/segment", files={"file": (f"load-{i}.svs", content)})
        except httpx.HTTPError as exc:
            print(f"  upload {i}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return None, time.perf_counter() - t
        ok = r.status_code == 202
        if not ok:
            print(f"  upload {i}: HTTP {r.status_code} {r.text[:200]}", file=sys.stderr)
        return (r.json()["job_id"] if ok else None), time.perf_counter() - t

    results = await asyncio.gather(*(one(i) for i in range(n)))
    ids = [job_id for job_id, _ in results if job_id]
    return ids, [dt for _, dt in results], n - len(ids)


async def poll_phase(
    client: httpx.AsyncClient, job_ids: list[str], rate_per_s: float, duration_s: float
) -> tuple[list[float], int, int, float]:
    latencies: list[float] = []
    errors = 0
    sem = asyncio.Semaphore(256)
    tasks: list[asyncio.Task[None]] = []

    async def one(job_id: str) -> None:
        nonlocal errors
        async with sem:
            t = time.perf_counter()
            try:
                r = await client.get(f"/jobs/{job_id}")
                if r.status_code != 200:
                    errors += 1
            except httpx.HTTPError:
                errors += 1
            latencies.append(time.perf_counter() - t)

    total = int(rate_per_s * duration_s)
    started = time.perf_counter()
    for i in range(total):
        delay = started + i / rate_per_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(job_ids[i % len(job_ids)])))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    return latencies, errors, total, elapsed


def server_side_quantiles(metrics_text: str, route: str, qs: tuple[float, ...]) -> dict[float, float]:
    """Upper bucket bounds holding the q-quantiles of the API's own request-duration histogram
    (excludes the load generator's scheduling delays on a busy machine)."""
    buckets: list[tuple[float, float]] = []
    for line in metrics_text.splitlines():
        if line.startswith("fprotoseg_http_request_duration_seconds_bucket{") and f'route="{route}"' in line:
            if 'method="GET"' not in line:
                continue
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    out = {}
    for q in qs:
        out[q] = next((le for le, n in buckets if total and n >= q * total), float("nan"))
    return out


def start_server(data_dir: Path, port: int, checkpoint: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPROTOSEG_")}
    env.update(
        {
            "FPROTOSEG_DATA_DIR": str(data_dir),
            "FPROTOSEG_API_KEYS": "bench-key",
            "FPROTOSEG_CHECKPOINT": str(checkpoint),
            "FPROTOSEG_DEVICE": "cpu",
            "MALLOC_MMAP_MAX_": "0",
            "MALLOC_TRIM_THRESHOLD_": "68719476736",
        }
    )
    cmd = [
        sys.executable,
        "-m",
        "fprotoseg.app.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=(data_dir / "serve.log").open("wb")
    )


async def main_async(args: argparse.Namespace) -> int:
    slide = args.slide.read_bytes()
    with tempfile.TemporaryDirectory(prefix="fprotoseg-load-") as tmp:
        tmp_dir = Path(tmp)
        checkpoint = args.checkpoint
        if checkpoint is None:
            from fprotoseg.model.networks.tiny import write_random_tiny_checkpoint

            checkpoint = write_random_tiny_checkpoint(tmp_dir / "tiny.safetensors")
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        (tmp_dir / "data").mkdir()
        server = start_server(tmp_dir / "data", port, checkpoint)
        base = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(
                base_url=base,
                headers={"X-API-Key": "bench-key"},
                timeout=120,
                limits=httpx.Limits(max_connections=256, max_keepalive_connections=256),
            ) as client:
                for _ in range(300):
                    try:
                        if (await client.get("/readyz")).status_code == 200:
                            break
                    except httpx.HTTPError:
                        pass
                    await asyncio.sleep(0.2)
                else:
                    print((tmp_dir / "data" / "serve.log").read_text()[-3000:], file=sys.stderr)
                    return 1
                rss_idle = rss_mib(server.pid)
                with RssSampler(server.pid) as sampler:
                    t = time.perf_counter()
                    job_ids, up_lat, up_err = await upload_phase(
                        client, slide, args.uploads, not args.same_bytes
                    )
                    up_s = time.perf_counter() - t
                rss_after_uploads = rss_mib(server.pid)
                mb = len(slide) * args.uploads / 2**20
                print(f"slide: {args.slide.name} ({len(slide) / 2**20:.2f} MiB); API pid {server.pid}")
                print(
                    f"uploads: {args.uploads} concurrent, {up_err} errors, {len(set(job_ids))} jobs, "
                    f"{mb:.1f} MiB in {up_s:.2f} s ({mb / up_s:.1f} MiB/s)"
                )
                p50_ms, p99_ms = pct(up_lat, 50) * 1000, pct(up_lat, 99) * 1000
                print(f"  upload latency p50 {p50_ms:.0f} ms, p99 {p99_ms:.0f} ms")
                print(
                    f"  API RSS: idle {rss_idle:.1f} MiB, peak during uploads {max(sampler.samples):.1f} MiB "
                    f"(+{max(sampler.samples) - rss_idle:.1f} MiB for {mb:.1f} MiB uploaded), "
                    f"after {rss_after_uploads:.1f} MiB"
                )
                if not job_ids:
                    return 1
                with RssSampler(server.pid, every_s=0.25) as poll_rss:
                    lat, errs, sent, elapsed = await poll_phase(
                        client, job_ids, args.poll_rate, args.duration
                    )
                print(
                    f"polls: {sent} GET /jobs/{{id}} in {elapsed:.1f} s ({sent / elapsed:.0f}/s, target "
                    f"{args.poll_rate:g}/s), {errs} errors"
                )
                print(f"  poll latency p50 {pct(lat, 50) * 1000:.1f} ms, p99 {pct(lat, 99) * 1000:.1f} ms")
                server_q = server_side_quantiles(
                    (await client.get("/metrics")).text, "/jobs/{job_id}", (0.5, 0.99)
                )
                print(
                    f"  server-side (API histogram buckets): p50 <= {server_q[0.5] * 1000:g} ms, "
                    f"p99 <= {server_q[0.99] * 1000:g} ms"
                )
                print(f"  API RSS during polls: max {max(poll_rss.samples):.1f} MiB")
                states: dict[str, int] = {}
                for job_id in job_ids:
                    state = (await client.get(f"/jobs/{job_id}")).json()["state"]
                    states[state] = states.get(state, 0) + 1
                print(f"jobs after the poll phase: {states} (embedded worker, tiny CPU model)")
                print(f"API peak RSS (VmHWM): {rss_mib(server.pid, 'VmHWM'):.1f} MiB")
                return 0 if up_err == 0 and errs == 0 else 1
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: a random tiny CNN")
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--poll-rate", type=float, default=200.0, help="status polls per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of polling")
    parser.add_argument(
        "--same-bytes", action="store_true", help="identical uploads (deduplicated to one job)"
    )
    args = parser.parse_args()
    args.uploads = max(1, min(args.uploads, 100))
    args.poll_rate = max(1.0, min(args.poll_rate, 1000.0))
    args.duration = max(1.0, min(args.duration, 300.0))
    if not args.slide.is_file():
        print(f"slide not found: {args.slide}", file=sys.stderr)
        return 2
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
