"""The API process never imports torch or OpenSlide (the API image ships neither)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

FORBIDDEN = (
    "torch",
    "openslide",
    "tiffslide",
    "cv2",
    "numpy",
    "fprotoseg.worker.wsi.pipeline",
    "fprotoseg.worker.wsi.slide",
    "fprotoseg.worker.service.tasks",
    "fprotoseg.worker.service.jobs",
)


def _modules_after(code: str, env: dict[str, str]) -> list[str]:
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))\n"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_api_never_imports_torch_or_openslide(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPROTOSEG_")}
    env.update({"FPROTOSEG_DATA_DIR": str(tmp_path), "FPROTOSEG_API_KEYS": "k"})
    code = (
        "from fastapi.testclient import TestClient\n"
        "from fprotoseg.app.main import create_app\n"
        "c = TestClient(create_app())\n"
        "r = c.post('/segment', files={'file': ('a.svs', open(%r, 'rb'))}, headers={'X-API-Key': 'k'})\n"
        "assert r.status_code == 202, r.text\n"
        "assert c.get('/metrics').status_code == 200 and c.get('/readyz').status_code == 503\n"
        "import fprotoseg.app.commands.serve, fprotoseg.app.commands.worker, fprotoseg.app.cli\n"
        "fprotoseg.app.cli.build_parser()\n"
    )
    import numpy as np
    import tifffile

    slide = tmp_path / "x.tif"  # a valid tiled TIFF: the API only sniffs it
    tifffile.imwrite(slide, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    modules = _modules_after(code % str(slide), env)
    assert "fprotoseg.app.main" in modules and "fastapi" in modules
    leaked = [m for m in modules if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN]
    assert leaked == [], leaked


def test_api_with_a_broker_sends_by_name_without_the_task_module(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPROTOSEG_")}
    env.update({"FPROTOSEG_DATA_DIR": str(tmp_path), "FPROTOSEG_BROKER_URL": "redis://127.0.0.1:1/0"})
    modules = _modules_after("from fprotoseg.app.main import create_app\ncreate_app()\n", env)
    assert "celery" in modules and "fprotoseg.worker.service.celery_app" in modules
    leaked = [m for m in modules if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN]
    assert leaked == [], leaked
