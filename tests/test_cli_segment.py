"""``fprotoseg segment`` / ``fprotoseg info`` as a user runs them: the real console script in a
subprocess, on every readable slide in ../shared/data/slides and on the bad inputs users send.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.stubs import render_known_slide_rgb, write_claimed_size_tiff, write_pyramid_tiff
from tests.worker.geometry import qupath_rule_violations

RESULT_FILES = ("segmentation.geojson", "stats.json", "mask.tiff", "overlay.png", "provenance.json")

READABLE = [
    # (path under slides/, extra CLI args, expected reader, expected vendor)
    pytest.param("CMU-1-Small-Region.svs", [], "openslide", "aperio", id="aperio-jpeg"),
    pytest.param(
        "TCGA-CR-7395-01A-01-TS1.svs", ["--mpp", "0.5"], "openslide", "aperio", id="aperio-jpeg2000"
    ),
    pytest.param("test3-DAPI-2-387.ndpi", [], "openslide", "hamamatsu", id="hamamatsu-ndpi"),
    pytest.param("OS-1-detail.ome.tif", [], "tiffslide", "ome-tiff", id="ome-tiff"),
    pytest.param(
        "derived/CMU-1-Small-Region.pyramid.tiff", [], "openslide", "generic-tiff", id="generic-pyramid"
    ),
]


def fprotoseg_exe() -> list[str]:
    exe = shutil.which("fprotoseg", path=str(Path(sys.executable).parent)) or shutil.which("fprotoseg")
    assert exe, "the fprotoseg console script is not installed (pip install -e .)"
    return [exe]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
    env.pop("FPROTOSEG_CHECKPOINT", None)
    return subprocess.run(
        [*fprotoseg_exe(), *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


@pytest.mark.parametrize(("rel", "extra", "reader", "vendor"), READABLE)
def test_segment_real_slide(tmp_path, shared_data, tiny_checkpoint, rel, extra, reader, vendor):
    slide = shared_data / "slides" / rel
    out = tmp_path / "out"
    proc = run_cli("segment", str(slide), "--out", str(out), "--checkpoint", str(tiny_checkpoint),
                   "--device", "cpu", "--batch-size", "16", "--no-progress", *extra)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for name in RESULT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    prov = json.loads((out / "provenance.json").read_text())
    stats = json.loads((out / "stats.json").read_text())
    assert prov["slide"]["reader"] == reader
    assert prov["slide"]["vendor"] == vendor
    assert len(prov["slide"]["sha256"]) == 64
    assert prov["model"]["checksum_sha256"] and prov["model"]["device"] == "cpu"
    assert set(prov["timings_s"]) >= {"open", "tissue", "tiling", "inference", "stitch", "vectorise", "write"}
    if "--mpp" in extra:
        assert prov["read"]["mpp_source"] == "override" and prov["read"]["mpp"] == 0.5
    else:
        assert prov["read"]["mpp_source"].startswith("metadata:")

    width, height = stats["slide"]["width"], stats["slide"]["height"]
    collection = json.loads((out / "segmentation.geojson").read_text())
    assert qupath_rule_violations(collection, width, height) == []
    if stats["tissue_area_um2"] > 0:
        assert collection["features"], "tissue found but no polygons written"
        assert sum(c["fraction_of_tissue"] for c in stats["classes"]) == pytest.approx(1.0)
    else:
        assert stats["warnings"], "an empty-tissue result must say so"
    # the summary names the outputs
    assert "segmentation.geojson" in proc.stdout


def test_info_prints_metadata(shared_data):
    proc = run_cli("info", str(shared_data / "slides" / "derived" / "CMU-1-Small-Region.pyramid.tiff"))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["level_count"] == 4
    assert info["mpp"] == pytest.approx(0.499)
    assert info["width_px"] == 2220 and info["height_px"] == 2967


def test_info_without_mpp_says_how_to_fix(shared_data):
    proc = run_cli("info", str(shared_data / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"))
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["mpp"] is None and "--mpp" in info["mpp_source"]


def test_segment_without_checkpoint_uses_packaged_default_or_says_so(shared_data, tmp_path):
    from fprotoseg.model import DEFAULT_CHECKPOINT

    slide = shared_data / "slides" / "OS-1-detail.ome.tif"
    proc = run_cli("segment", str(slide), "--out", str(tmp_path / "o"), "--no-progress", "--device", "cpu")
    if DEFAULT_CHECKPOINT.exists():
        assert proc.returncode == 0, proc.stderr
        prov = json.loads((tmp_path / "o" / "provenance.json").read_text())
        assert prov["model"]["checksum_sha256"]
    else:
        assert proc.returncode == 2
        assert proc.stderr.strip().count("\n") == 0 and "--checkpoint" in proc.stderr


# ------------------------------------------------------------------------------------- bad inputs
def _empty(tmp: Path, data: Path) -> Path:
    p = tmp / "empty.svs"
    p.write_bytes(b"")
    return p


def _text(tmp: Path, data: Path) -> Path:
    p = tmp / "notes.svs"
    p.write_text("patient notes, not a slide\n" * 20)
    return p


def _truncated(tmp: Path, data: Path) -> Path:
    src = (data / "slides" / "CMU-1-Small-Region.svs").read_bytes()
    p = tmp / "truncated.svs"
    p.write_bytes(src[: len(src) * 6 // 10])
    return p


def _dicom(tmp: Path, data: Path) -> Path:
    return data / "slides" / "nonconformant" / "pathml-small_dicom.dcm"


def _no_mpp(tmp: Path, data: Path) -> Path:
    rgb, _ = render_known_slide_rgb(data / "patches", 1.0)
    return write_pyramid_tiff(tmp / "no-mpp.tiff", rgb, None, 2)


def _bomb(tmp: Path, data: Path) -> Path:
    return write_claimed_size_tiff(tmp / "bomb.tiff", 200_000, 200_000)


BAD_INPUTS = [
    pytest.param(_empty, "empty", id="empty-file"),
    pytest.param(_text, "not a whole-slide image", id="text-named-svs"),
    pytest.param(_truncated, "truncated", id="truncated-svs"),
    pytest.param(_dicom, "cannot be opened", id="nonconformant-dicom"),
    pytest.param(_no_mpp, "--mpp", id="no-mpp"),
    pytest.param(_bomb, "200000x200000", id="claims-200000x200000"),
]


@pytest.mark.parametrize(("make", "expected"), BAD_INPUTS)
@pytest.mark.parametrize("command", ["segment", "info"])
def test_bad_input_one_line_error(tmp_path, shared_data, tiny_checkpoint, make, expected, command):
    slide = make(tmp_path, shared_data)
    args = [command, str(slide)]
    if command == "segment":
        args += ["--out", str(tmp_path / "out"), "--checkpoint", str(tiny_checkpoint), "--no-progress"]
    started = time.monotonic()
    proc = run_cli(*args, timeout=60)
    elapsed = time.monotonic() - started
    if command == "info" and make is _no_mpp:
        # info reports the missing pixel size instead of failing
        assert proc.returncode == 0 and "--mpp" in json.loads(proc.stdout)["mpp_source"]
        return
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fprotoseg: error: ")
    assert expected in lines[0]
    assert elapsed < 60
    assert not (tmp_path / "out").exists(), "a failed run must not leave a half-written result"


def test_bomb_is_refused_without_allocating(tmp_path):
    """The 200000 x 200000 claim fails in the vetting step: peak RSS stays that of a bare process.

    VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the (large) pytest parent across exec.
    """
    bomb = write_claimed_size_tiff(tmp_path / "bomb.tiff", 200_000, 200_000)
    code = (
        "import re, sys\n"
        "from fprotoseg.worker.wsi.slide import open_slide\n"
        "from fprotoseg.worker.errors import SlideTooLargeError\n"
        "try:\n"
        f"    open_slide({str(bomb)!r})\n"
        "except SlideTooLargeError as e:\n"
        "    status = open('/proc/self/status').read()\n"
        "    print(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1))\n"
        "    sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    peak_kib = int(proc.stdout.strip())
    assert peak_kib < 400 * 1024, f"peak RSS {peak_kib} KiB while refusing a bomb"
