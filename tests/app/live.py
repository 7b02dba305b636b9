"""Helpers for end-to-end tests: real server/worker processes, a real Redis, QuPath GeoJSON rules."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

API_KEY = "test-key-0123456789"
TORCH_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736", "OMP_NUM_THREADS": "2"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fprotoseg_cmd(*args: str) -> list[str]:
    exe = shutil.which("fprotoseg", path=str(Path(sys.executable).parent))
    return [exe, *args] if exe else [sys.executable, "-m", "fprotoseg.app.cli", *args]


def service_env(data_dir: Path, checkpoint: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPROTOSEG_")}
    env.update(TORCH_ENV)
    env.update(
        {
            "FPROTOSEG_DATA_DIR": str(data_dir),
            "FPROTOSEG_CHECKPOINT": str(checkpoint),
            "FPROTOSEG_API_KEYS": API_KEY,
            "FPROTOSEG_DEVICE": "cpu",
        }
    )
    env.update(extra)
    return env


class Proc:
    """A child process with its output in a log file (read back on failure)."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, then check that no child (e.g. the embedded worker) outlives the process."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill_group()
        self._log.close()
        deadline = time.monotonic() + timeout_s
        while self.group_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.group_alive():
            self.kill_group()
            raise AssertionError(f"{self.popen.args} left child processes running after SIGTERM")

    def group_alive(self) -> bool:
        try:
            os.killpg(self.popen.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill_group(self) -> None:
        """SIGKILL the process and all its children (a Celery worker and its pool process)."""
        with suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)


@contextmanager
def api_server(data_dir: Path, checkpoint: Path, log_path: Path, **env_extra: str) -> Iterator[str]:
    """``fprotoseg serve`` on a free port; yields its base URL once /healthz answers."""
    port = free_port()
    env = service_env(data_dir, checkpoint, **env_extra)
    proc = Proc(fprotoseg_cmd("serve", "--host", "127.0.0.1", "--port", str(port)), env, log_path)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/healthz", proc, timeout_s=60)
        yield url
    finally:
        proc.stop()


@contextmanager
def api_client(data_dir: Path, checkpoint: Path, log_path: Path, **env_extra: str) -> Iterator[httpx.Client]:
    """An httpx client (with the API key) on a fresh ``fprotoseg serve``."""
    with (
        api_server(data_dir, checkpoint, log_path, **env_extra) as url,
        httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=60) as client,
    ):
        yield client


def wait_http(url: str, proc: Proc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"server exited early:\n{proc.log()}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout_s} s:\n{proc.log()}")


def wait_ready(client: httpx.Client, timeout_s: float = 90.0) -> dict[str, Any]:
    """Poll /readyz until a worker answers."""
    deadline = time.monotonic() + timeout_s
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        body = r.json()
        if r.status_code == 200:
            return body
        time.sleep(0.5)
    raise AssertionError(f"not ready after {timeout_s} s: {body}")


def poll_job(client: httpx.Client, job_id: str, timeout_s: float = 180.0) -> dict[str, Any]:
    """Poll until the job is terminal; progress must never go backwards within one attempt."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = client.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        last = r.json()
        assert 0.0 <= last["progress"] <= 1.0
        if last["state"] in ("succeeded", "failed", "cancelled"):
            return last
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} not finished after {timeout_s} s: {last}")


def assert_no_stack_trace(text: str) -> None:
    assert "Traceback" not in text and 'File "' not in text and '.py", line' not in text, text[:500]


def check_qupath_geojson(collection: dict[str, Any], width_px: int, height_px: int) -> int:
    """QuPath's import rules; returns the number of features checked."""
    from shapely.geometry import shape
    from shapely.validation import explain_validity

    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    for feat in features:
        assert feat["type"] == "Feature"
        props = feat["properties"]
        assert props["objectType"] == "annotation"
        cls = props["classification"]
        assert isinstance(cls["name"], str) and cls["name"]
        assert isinstance(cls["color"], list) and len(cls["color"]) == 3
        assert all(isinstance(c, int) and 0 <= c <= 255 for c in cls["color"])
        assert props["measurements"]["area_um2"] > 0
        geom = feat["geometry"]
        assert geom["type"] in ("Polygon", "MultiPolygon")
        polygons = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        for rings in polygons:
            for ring in rings:
                assert len(ring) >= 4, "a ring needs at least 4 positions"
                assert ring[0] == ring[-1], "rings must be closed"
                for x, y in ring:
                    assert -1 <= x <= width_px + 1 and -1 <= y <= height_px + 1, (x, y)
        g = shape(geom)
        assert g.is_valid, explain_validity(g)
        assert not g.is_empty
    return len(features)


def redis_available(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except Exception:
        return False


@contextmanager
def redis_url_for_tests(tmp_dir: Path) -> Iterator[tuple[str, str]]:
    """(url, key prefix) on the Redis at 127.0.0.1:6379 (DB 11), or a private redis-server.

    All keys live under a unique prefix and are deleted afterwards.
    """
    import redis

    url = "redis://127.0.0.1:6379/11"
    private: subprocess.Popen[bytes] | None = None
    if not redis_available(url):
        exe = shutil.which("redis-server")
        if exe is None:
            import pytest

            pytest.skip("no Redis at 127.0.0.1:6379 and no redis-server binary")
        port = free_port()
        private = subprocess.Popen(
            [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/11"
        for _ in range(50):
            if redis_available(url):
                break
            time.sleep(0.1)
    prefix = f"fprotoseg-test-{uuid.uuid4().hex[:10]}:"
    try:
        yield url, prefix
    finally:
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
        if private is not None:
            private.terminate()
            private.wait(10)


def write_mosaic_slide(source: Path, out: Path, repeat: tuple[int, int]) -> tuple[int, int]:
    """A bigger real-tissue slide: the source slide's level-0 pixels tiled ``repeat`` (rows, cols)
    times, written as a tiled JPEG TIFF with the source's pixel size in the resolution tags."""
    import numpy as np
    import tifffile

    with tifffile.TiffFile(source) as tif:
        pixels = tif.pages[0].asarray()
    mosaic = np.tile(pixels[..., :3], (repeat[0], repeat[1], 1))
    px_per_cm = 1e4 / 0.499
    tifffile.imwrite(
        out,
        mosaic,
        photometric="rgb",
        tile=(256, 256),
        compression="jpeg",
        compressionargs={"level": 85},
        resolution=(px_per_cm, px_per_cm),
        resolutionunit="CENTIMETER",
    )
    return mosaic.shape[1], mosaic.shape[0]


class CallbackRecorder:
    """A LIMS stand-in: records every callback POST (body and headers)."""

    def __init__(self, status: int = 204) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                recorder.received.append((dict(self.headers), body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/lims/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
