"""Several models: the catalogue (packaged + FPROTOSEG_MODELS_DIR) read from manifests without torch,
``GET /models``, ``model=NAME`` per job on a real server (the packaged model and a real second
checkpoint, the same slide, different results), ``422 unknown_model`` leaving nothing behind, the
CLI's ``--checkpoint NAME``, and the worker's cache of loaded models."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fprotoseg.model.catalog import (
    DEFAULT_MODEL_NAME,
    installed_models,
    list_models,
    resolve_checkpoint,
)
from fprotoseg.model.errors import UnknownModelError
from fprotoseg.model.networks.tiny import write_random_tiny_checkpoint
from tests.app.live import api_client, poll_job, wait_ready
from tests.conftest import REPO_ROOT

SLIDE = "slides/CMU-1-Small-Region.svs"
BREAST = [("Tumor", (200, 0, 0)), ("Stroma", (150, 200, 150)), ("Lymphocytes", (120, 0, 200)),
          ("Necrosis", (80, 80, 80))]


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real (random-weight) checkpoints, one with other classes, and a stray non-checkpoint."""
    folder = tmp_path_factory.mktemp("models")
    write_random_tiny_checkpoint(folder / "tiny_luad.safetensors", seed=1)
    write_random_tiny_checkpoint(folder / "tiny_breast.safetensors", classes=BREAST, seed=2, tile_size_px=192)
    (folder / "broken.safetensors").write_bytes(b"not a checkpoint at all")
    (folder / "notes.txt").write_text("not a model")
    return folder


def test_catalogue_lists_packaged_and_models_dir_from_manifests(models_dir: Path) -> None:
    models = list_models(models_dir)
    assert DEFAULT_MODEL_NAME in models and models[DEFAULT_MODEL_NAME].source == "packaged"
    assert {"tiny_luad", "tiny_breast"} <= set(models) and "broken" not in models
    breast = models["tiny_breast"].describe(DEFAULT_MODEL_NAME)
    assert [c["name"] for c in breast["classes"]] == [n for n, _ in BREAST]
    assert breast["tile_size_px"] == 192 and breast["default"] is False
    packaged = models[DEFAULT_MODEL_NAME].describe(DEFAULT_MODEL_NAME)
    assert packaged["default"] is True and packaged["metrics"]  # the held-out scores of its manifest
    assert resolve_checkpoint("tiny_breast", models_dir) == models_dir / "tiny_breast.safetensors"
    assert resolve_checkpoint(None) == models[DEFAULT_MODEL_NAME].path
    with pytest.raises(UnknownModelError) as err:
        resolve_checkpoint("nope", models_dir)
    assert "tiny_breast" in err.value.message and "tiny_luad" in err.value.known


def test_catalogue_never_imports_torch(models_dir: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from fprotoseg.model.catalog import installed_models;"
        f"m, d = installed_models(None, Path({str(models_dir)!r})); assert 'tiny_breast' in m;"
        "assert 'torch' not in sys.modules and 'safetensors' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_configured_checkpoint_path_is_listed_as_the_default(
    models_dir: Path, tiny_checkpoint: Path
) -> None:
    models, default = installed_models(tiny_checkpoint, models_dir)
    assert default == tiny_checkpoint.stem and models[default].source == "configured"
    models, default = installed_models("tiny_breast", models_dir)
    assert default == "tiny_breast" and models[default].source == "models_dir"


def test_worker_caches_loaded_models(models_dir: Path) -> None:
    from fprotoseg.worker.service import segmenters
    from fprotoseg.worker.service.settings import Settings

    settings = Settings(models_dir=models_dir, device="cpu", model_cache_size=1)
    first = segmenters.get_segmenter(settings, "tiny_luad")
    assert segmenters.get_segmenter(settings, "tiny_luad") is first  # loaded once
    other = segmenters.get_segmenter(settings, "tiny_breast")
    assert [c.name for c in other.classes] == [n for n, _ in BREAST]
    assert segmenters.cached_models() == 1  # least recently used out
    assert segmenters.get_segmenter(settings, "tiny_luad") is not first  # reloaded after eviction
    with pytest.raises(UnknownModelError):
        segmenters.get_segmenter(settings, "removed_model")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path):
    data_dir = tmp_path_factory.mktemp("models-data")
    log = tmp_path_factory.mktemp("models-logs") / "serve.log"
    packaged = REPO_ROOT / "model" / "weights" / f"{DEFAULT_MODEL_NAME}.safetensors"
    env = {"FPROTOSEG_MODELS_DIR": str(models_dir), "FPROTOSEG_BATCH_SIZE": "4", "FPROTOSEG_MIN_FREE_MB": "0"}
    with api_client(data_dir, packaged, log, **env) as client:
        wait_ready(client)
        yield client, data_dir


def test_get_models_lists_every_model(server) -> None:
    client, _ = server
    body = client.get("/models").json()
    names = {m["name"]: m for m in body["models"]}
    assert body["default"] == DEFAULT_MODEL_NAME and names[DEFAULT_MODEL_NAME]["default"]
    assert {"tiny_luad", "tiny_breast"} <= set(names)
    assert names["tiny_breast"]["classes"][2] == {"name": "Lymphocytes", "color": [120, 0, 200]}
    assert httpx.get(str(client.base_url) + "/models", timeout=10).status_code == 401


def test_unknown_model_is_422_listing_known_ones_and_leaves_nothing(server, shared_data: Path) -> None:
    client, data_dir = server
    before = sorted(p.name for p in (data_dir / "uploads").iterdir())
    slide = (shared_data / SLIDE).read_bytes()
    r = client.post("/segment", files={"file": ("a.svs", slide)}, data={"model": "no_such_model"})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    problem = r.json()
    assert problem["code"] == "unknown_model"
    assert {"tiny_luad", "tiny_breast", DEFAULT_MODEL_NAME} <= set(problem["known_models"])
    assert "tiny_breast" in problem["detail"]
    assert sorted(p.name for p in (data_dir / "uploads").iterdir()) == before
    assert client.get("/jobs").json()["total"] == 0 or all(
        j["model"] != "no_such_model" for j in client.get("/jobs").json()["jobs"]
    )


def test_each_job_runs_the_model_it_names(server, shared_data: Path, models_dir: Path) -> None:
    client, _ = server
    slide = (shared_data / SLIDE).read_bytes()
    jobs = {}
    for model in (None, "tiny_breast"):
        data = {"model": model} if model else {}
        r = client.post("/segment", files={"file": ("CMU-1-Small-Region.svs", slide)}, data=data)
        assert r.status_code == 202, r.text
        jobs[model] = poll_job(client, r.json()["job_id"])
        assert jobs[model]["state"] == "succeeded", jobs[model]
    assert jobs[None]["model"] == DEFAULT_MODEL_NAME and jobs["tiny_breast"]["model"] == "tiny_breast"
    default_prov = client.get(jobs[None]["links"]["provenance"]).json()
    breast_prov = client.get(jobs["tiny_breast"]["links"]["provenance"]).json()
    breast_sha = hashlib.sha256((models_dir / "tiny_breast.safetensors").read_bytes()).hexdigest()
    assert breast_prov["model"]["checksum_sha256"] == breast_sha
    assert default_prov["model"]["checksum_sha256"] != breast_sha
    assert breast_prov["job"]["model"] == "tiny_breast" and default_prov["job"]["model"] == DEFAULT_MODEL_NAME
    stats = client.get(jobs["tiny_breast"]["links"]["stats"]).json()
    assert [c["name"] for c in stats["classes"]] == [n for n, _ in BREAST]
    # naming the default is the default: the same upload replays the first job
    r = client.post("/segment", files={"file": ("CMU-1-Small-Region.svs", slide)},
                    data={"model": DEFAULT_MODEL_NAME})
    assert r.json()["job_id"] == jobs[None]["job_id"] and r.headers["idempotent-replayed"] == "true"


def test_cli_checkpoint_takes_a_model_name(tmp_path: Path, shared_data: Path, models_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPROTOSEG_")}
    env.update({"FPROTOSEG_MODELS_DIR": str(models_dir), "FPROTOSEG_DEVICE": "cpu"})
    exe = [sys.executable, "-m", "fprotoseg.app.cli"]
    out = tmp_path / "out"
    proc = subprocess.run(
        [*exe, "segment", str(shared_data / SLIDE), "--out", str(out), "--checkpoint", "tiny_breast"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "provenance.json").read_text())["model"]["name"] == "tiny-cnn-random-seed2"
    proc = subprocess.run(
        [*exe, "segment", str(shared_data / SLIDE), "--out", str(out), "--checkpoint", "nope"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown model 'nope'; known models:" in proc.stderr and "tiny_breast" in proc.stderr
