"""The built distribution claims one import name, ``fprotoseg``, and works installed from the wheel.

Why: a LIMS integration or a notebook that installs fprotoseg beside its own ``app`` or ``model``
must not get ours. The wheel is built offline (no build isolation: setuptools from this
environment) and imported from its unpacked files with the repository off ``sys.path``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the sources: setuptools' build/ folder in the checkout could hold stale files.
    src = tmp_path_factory.mktemp("wheel-src")
    for name in ("pyproject.toml", "README.md", "app", "worker", "model"):
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=600, cwd=src,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = out.glob("fprotoseg-*.whl")
    return found


def test_the_wheel_installs_only_the_fprotoseg_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"fprotoseg", next(t for t in top if t.endswith(".dist-info"))}, sorted(top)
    for expected in (
        "fprotoseg/app/main.py",
        "fprotoseg/worker/service/jobs.py",
        "fprotoseg/worker/wsi/pipeline.py",
        "fprotoseg/model/segmenter.py",
        "fprotoseg/model/configs/wsss4luad_default.yaml",
        # slide QC's stain range of the packaged model, beside its checkpoint
        "fprotoseg/model/weights/fprotoseg_wsss4luad.qc.json",
        # the result viewer needs no CDN: OpenSeadragon ships with its licence, beside the page's assets
        "fprotoseg/app/static/openseadragon/openseadragon.min.js",
        "fprotoseg/app/static/openseadragon/LICENSE.txt",
        "fprotoseg/app/static/viewer.js",
        "fprotoseg/app/static/viewer.css",
    ):
        assert expected in names, expected
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "fprotoseg = fprotoseg.app.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_wheel_imports(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    repo, where = str(REPO_ROOT), str(site)
    code = (
        f"import sys; sys.path[:] = [p for p in sys.path if p not in ('', {repo!r})]\n"
        "import fprotoseg.worker, fprotoseg.app, fprotoseg.model\n"
        "import fprotoseg.app.main, fprotoseg.worker.service.jobs, fprotoseg.worker.wsi.pipeline\n"
        "import fprotoseg.model.networks.cam_cnn, fprotoseg.model.training.ship\n"  # the model's rooms
        f"assert fprotoseg.app.__file__.startswith({where!r}), fprotoseg.app.__file__\n"
        f"assert fprotoseg.model.networks.cam_cnn.__file__.startswith({where!r})\n"
        f"assert fprotoseg.model.training.ship.__file__.startswith({where!r})\n"
        "assert fprotoseg.model.DEFAULT_CHECKPOINT.parent.name == 'weights'\n"
        "for bare in ('app', 'worker', 'model'):\n"
        "    try:\n"
        "        __import__(bare)\n"
        "    except ModuleNotFoundError:\n"
        "        continue\n"
        "    raise SystemExit(f'{bare} is importable: the wheel leaked a generic name')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_the_package_metadata_builds_without_deprecations(tmp_path: Path) -> None:
    """setuptools deprecates the ``project.license`` table (removal dated February 2027); with the
    SPDX string and setuptools pinned in ``build-system.requires`` installs keep working after it."""
    import tomllib

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert isinstance(pyproject["project"]["license"], str)
    (setuptools_req,) = [r for r in pyproject["build-system"]["requires"] if r.startswith("setuptools")]
    assert "<" in setuptools_req, "setuptools needs an upper bound in build-system.requires"
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, tmp_path / name)
    roots = pyproject["tool"]["setuptools"]["package-dir"]
    for package in pyproject["tool"]["setuptools"]["packages"]:  # the folders, not the code
        root = next(r for r in roots if package == r or package.startswith(r + "."))
        folder = tmp_path / roots[root] / package[len(root) + 1 :].replace(".", "/")
        folder.mkdir(parents=True, exist_ok=True)
    code = (
        "import warnings\n"
        "from setuptools import SetuptoolsDeprecationWarning\n"
        "warnings.simplefilter('error', SetuptoolsDeprecationWarning)\n"
        "from setuptools import build_meta\n"
        f"build_meta.prepare_metadata_for_build_wheel({str(tmp_path / 'meta')!r})\n"
    )
    (tmp_path / "meta").mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
