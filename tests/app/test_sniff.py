"""Format sniffing from the bytes (worker.wsi.validate): slides pass, everything else gets a reason."""

from __future__ import annotations

import gzip
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile

from fprotoseg.worker.errors import SlideError
from fprotoseg.worker.wsi.validate import sniff


@pytest.mark.parametrize(
    ("name", "fmt", "ext"),
    [
        ("slides/CMU-1-Small-Region.svs", "aperio-svs", ".svs"),
        ("slides/TCGA-CR-7395-01A-01-TS1.svs", "aperio-svs", ".svs"),
        ("slides/test3-DAPI-2-387.ndpi", "hamamatsu-ndpi", ".ndpi"),
        ("slides/OS-1-detail.ome.tif", "ome-tiff", ".ome.tif"),
        ("slides/derived/CMU-1-Small-Region.pyramid.tiff", "tiff", ".tiff"),
        ("slides/nonconformant/pathml-small_dicom.dcm", "dicom", ".dcm"),
    ],
)
def test_real_slides_are_recognised(shared_data: Path, name: str, fmt: str, ext: str) -> None:
    path = shared_data / name
    found = sniff(path, path.name)
    assert (found.name, found.extension) == (fmt, ext)


@pytest.mark.parametrize("bigtiff", [False, True])
def test_generated_tiff_and_bigtiff(tmp_path: Path, bigtiff: bool) -> None:
    path = tmp_path / "s.tif"
    tifffile.imwrite(
        path, np.zeros((600, 700, 3), np.uint8), tile=(256, 256), photometric="rgb", bigtiff=bigtiff
    )
    found = sniff(path, "../../evil name.tif")
    assert found.name == ("bigtiff" if bigtiff else "tiff")
    assert (found.width_px, found.height_px) == (700, 600) and found.extension == ".tif"


def _refused(tmp_path: Path, content: bytes, filename: str = "x.svs") -> SlideError:
    path = tmp_path / "upload"
    path.write_bytes(content)
    with pytest.raises(SlideError) as info:
        sniff(path, filename)
    return info.value


def test_non_slides_are_refused_with_what_they_look_like(tmp_path: Path) -> None:
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as zf:
        zf.writestr("a.svs", b"x")
    cases = {
        "PNG": png.getvalue(),
        "JPEG": jpeg.getvalue(),
        "ZIP": zbuf.getvalue(),
        "gzip": gzip.compress(b"II*\x00" * 100),
        "PDF": b"%PDF-1.7\n" + b"x" * 100,
        "text": b"Patient: anonymous\nnot a slide\n" * 20,
    }
    for what, content in cases.items():
        problem = _refused(tmp_path, content)
        assert problem.http_status == 415 and what in problem.message, (what, problem.message)
        assert problem.code == "unsupported_format"
    random_bytes = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    assert _refused(tmp_path, random_bytes).http_status == 415
    empty = _refused(tmp_path, b"")
    assert empty.http_status == 400 and empty.code == "empty_upload"


def test_truncated_tiffs_are_refused_before_any_worker_sees_them(tmp_path: Path, shared_data: Path) -> None:
    slide = (shared_data / "slides/CMU-1-Small-Region.svs").read_bytes()
    for cut in (8, 100, len(slide) // 3, len(slide) // 2):  # level-0 tiles fill the first ~90%
        problem = _refused(tmp_path, slide[:cut])
        assert problem.http_status == 422 and "truncated" in problem.message, (cut, problem.message)
        assert problem.code == "corrupt_slide"
    assert _refused(tmp_path, b"II*\x00").http_status == 422
    assert _refused(tmp_path, b"II*\x00\xff\xff\xff\x7f" + b"\0" * 100).http_status == 422  # IFD past the end
