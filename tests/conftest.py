"""Shared fixtures: where the real data lives, and a tiny real network checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``../shared/data`` beside the repository (override with FPROTOSEG_SHARED_DATA)."""
    env = os.environ.get("FPROTOSEG_SHARED_DATA")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data not found at {path} (set FPROTOSEG_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (random-weight) CNN saved as a valid checkpoint at 1.0 µm/px, 224 px tiles."""
    from fprotoseg.model.networks.tiny import write_random_tiny_checkpoint

    return write_random_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="session")
def dicom_series(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> Path:
    """CMU-1-Small-Region.svs as a DICOM WSI series in <root>/CMU-1 series/ (wsidicomizer, JPEG 2000
    lossless, so the series holds the slide's own pixels; made here, never stored)."""
    from tests.stubs import write_dicom_series

    folder = tmp_path_factory.mktemp("dicom-root") / "CMU-1 series"
    return write_dicom_series(shared_data / "slides" / "CMU-1-Small-Region.svs", folder)
