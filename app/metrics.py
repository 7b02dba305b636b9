"""Prometheus metrics: jobs by state, job duration, tiles/s, queue depth, HTTP requests.

Job metrics are read from the job store at scrape time (workers write them there as jobs
finish), so they are the same whichever API replica is scraped and survive restarts. HTTP
metrics are per API process. One registry per app: no global state.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fprotoseg.app.dispatch import Dispatcher
from fprotoseg.worker.errors import JobStoreError
from fprotoseg.worker.service.jobstore import DURATION_BUCKETS_S, JobStore


class JobCollector(Collector):
    def __init__(self, store: JobStore, dispatcher: Dispatcher) -> None:
        self.store, self.dispatcher = store, dispatcher

    def collect(self) -> Iterator[Metric]:
        try:
            counts = self.store.counts_by_state()
            stored = self.store.metrics()
        except JobStoreError:
            up = GaugeMetricFamily("fprotoseg_jobstore_up", "1 when the job store answers")
            up.add_metric([], 0)
            yield up
            return
        up = GaugeMetricFamily("fprotoseg_jobstore_up", "1 when the job store answers")
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("fprotoseg_jobs", "Jobs by state", labels=["state"])
        for state, n in counts.items():
            jobs.add_metric([state], n)
        yield jobs
        depth = GaugeMetricFamily("fprotoseg_queue_depth", "Jobs queued and not yet started")
        depth.add_metric([], counts.get("queued", 0))
        yield depth
        broker_len = self.dispatcher.broker_queue_length()
        if broker_len is not None:
            g = GaugeMetricFamily("fprotoseg_broker_queue_length", "Messages waiting in the Celery queue")
            g.add_metric([], broker_len)
            yield g
        buckets = [(f"{b:g}", stored.get(f"duration_le_{b:g}", 0.0)) for b in DURATION_BUCKETS_S]
        buckets.append(("+Inf", stored.get("duration_count", 0.0)))
        hist = HistogramMetricFamily("fprotoseg_job_duration_seconds", "Wall time of succeeded jobs")
        hist.add_metric([], buckets, sum_value=stored.get("duration_sum", 0.0))
        yield hist
        tiles = CounterMetricFamily("fprotoseg_tiles_processed", "Tiles inferred by succeeded jobs")
        tiles.add_metric([], stored.get("tiles_total", 0.0))
        yield tiles
        for name, key, what in (
            (
                "fprotoseg_retention_jobs_deleted",
                "retention_jobs_deleted",
                "Finished jobs deleted by retention",
            ),
            (
                "fprotoseg_retention_bytes_reclaimed",
                "retention_bytes_reclaimed",
                "Bytes of uploads and results deleted by retention (FPROTOSEG_RETENTION_DAYS)",
            ),
        ):
            counter = CounterMetricFamily(name, what)
            counter.add_metric([], stored.get(key, 0.0))
            yield counter
        secs = stored.get("tile_seconds_total", 0.0)
        rate = GaugeMetricFamily("fprotoseg_tiles_per_second", "Tiles per second over all succeeded jobs")
        rate.add_metric([], stored.get("tiles_total", 0.0) / secs if secs > 0 else 0.0)
        yield rate


def install_metrics(app: FastAPI, store: JobStore, dispatcher: Dispatcher) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(JobCollector(store, dispatcher))
    requests = Counter(
        "fprotoseg_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry
    )
    latency = Histogram(
        "fprotoseg_http_request_duration_seconds",
        "HTTP request latency",
        ["method", "route"],
        registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
    )

    async def observe(scope: Scope, receive: Receive, send: Send, inner: ASGIApp) -> None:
        """Pure ASGI (no BaseHTTPMiddleware): counts and times requests by route template."""
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await inner(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            requests.labels(scope["method"], path, str(status["code"])).inc()
            latency.labels(scope["method"], path).observe(time.perf_counter() - started)

    class _Observe:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            await observe(scope, receive, send, self.app)

    app.add_middleware(_Observe)
    return registry
