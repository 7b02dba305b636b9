"""Fixtures the worker tests share: one definition each (tests/test_fixtures.py checks it)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from tests.stubs import render_known_slide_rgb, write_pyramid_tiff


class KnownSlide(NamedTuple):
    """A real-H&E slide of the known shapes (tests/stubs.py) at 1 µm/px, and its truth labels."""

    path: Path
    truth: np.ndarray


@pytest.fixture(scope="session")
def known_slide(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> KnownSlide:
    rgb, truth = render_known_slide_rgb(shared_data / "patches", 1.0)
    return KnownSlide(write_pyramid_tiff(tmp_path_factory.mktemp("slide") / "known.tiff", rgb, 1.0, 2), truth)
