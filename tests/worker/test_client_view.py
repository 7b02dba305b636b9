"""A job error as its HTTP client reads it: the client's file name, the fix worded for the API, and
no server path; from real errors of the slide reader, not from strings made up here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from fprotoseg.worker.errors import MissingMppError, SlideError
from fprotoseg.worker.service.client_view import client_message
from fprotoseg.worker.service.jobstore import JobRecord
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.wsi.slide import open_slide


def test_a_missing_pixel_size_names_the_form_field_and_the_clients_file(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    stored = settings.uploads_dir / "0f3c.tiff"
    stored.parent.mkdir(parents=True)
    tifffile.imwrite(stored, np.full((512, 512, 3), 200, np.uint8), tile=(256, 256), photometric="rgb")
    with pytest.raises(MissingMppError) as info:
        open_slide(stored)
    assert "--mpp" in info.value.message  # the CLI's wording
    rec = JobRecord(id="0f3c", upload_path=str(stored.relative_to(settings.data_dir)), filename="case 7.tiff")
    message = client_message(rec, info.value, settings)
    assert message.startswith("'case 7.tiff' has no pixel size")
    assert "send it in the form field mpp" in message and "--mpp" not in message and "0f3c" not in message


def test_no_server_path_reaches_the_client(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    rec = JobRecord(id="9a1b", upload_path="uploads/9a1b.svs", filename="slide.svs")
    with pytest.raises(SlideError) as info:
        open_slide(settings.data_dir / rec.upload_path)  # gone from the data dir: named in full
    assert str(settings.data_dir) in info.value.message
    message = client_message(rec, info.value, settings)
    assert str(tmp_path) not in message and "9a1b" not in message and "'slide.svs'" in message
