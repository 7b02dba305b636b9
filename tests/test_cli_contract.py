"""Issue 22, item 11: ``fprotoseg segment`` as a newcomer runs it on a DICOM WSI folder, and its
progress output in a terminal and in a log (the real console script in a subprocess)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import termios
import time
from pathlib import Path

from tests.test_cli_segment import RESULT_FILES, fprotoseg_exe, run_cli

CLI_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def test_segment_a_dicom_series_folder_named_as_the_readme_does(
    tmp_path: Path, dicom_series: Path, tiny_checkpoint
):
    """``fprotoseg segment "CMU-1 series/"`` from the folder that holds it: results, no traceback, the
    folder's checksum in provenance.json (the one the service records), the series left untouched."""
    from fprotoseg.worker.wsi.dicom import folder_sha256, series_files

    before = sorted(p.name for p in dicom_series.iterdir())
    (tmp_path / "CMU-1 series").symlink_to(dicom_series, target_is_directory=True)
    proc = run_cli(
        "segment",
        "CMU-1 series/",
        "--checkpoint",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--batch-size",
        "16",
        "--no-progress",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "IsADirectoryError" not in proc.stderr
    assert sorted(p.name for p in dicom_series.iterdir()) == before, "results written into the series"
    out = tmp_path / "CMU-1 series results"
    for name in RESULT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["slide"]["sha256"] == folder_sha256(series_files(dicom_series, 1000), dicom_series)[0]
    assert prov["slide"]["vendor"] == "dicom"
    assert str(out) in proc.stdout


def test_the_formats_the_cli_names_include_dicom(tmp_path: Path) -> None:
    proc = run_cli("segment", "--help")
    assert proc.returncode == 0 and "DICOM" in proc.stdout
    notes = tmp_path / "notes.svs"
    notes.write_text("not a slide\n" * 20)
    proc = run_cli("segment", str(notes), "--no-progress")
    assert proc.returncode == 2 and "DICOM" in proc.stderr, proc.stderr


def _segment_args(shared_data: Path, tiny_checkpoint: Path, out: Path) -> list[str]:
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"  # about 40 tiles of the tiny network
    return [
        "segment",
        str(slide),
        "--out",
        str(out),
        "--checkpoint",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--batch-size",
        "4",
    ]


def _tiles_inferred(out: Path) -> int:
    """The tiles the run says it inferred (provenance.json): what the progress bar must count to."""
    tiles = int(json.loads((out / "provenance.json").read_text())["tiles"]["inferred"])
    assert tiles > 10  # enough for the bar to move in several steps
    return tiles


def test_without_a_terminal_progress_is_a_few_plain_lines(tmp_path: Path, shared_data: Path, tiny_checkpoint):
    """In a log (stderr a pipe) one line per stage and per 5 % of the tiles at most, no carriage
    returns, no bar characters; the inference lines count tiles."""
    proc = run_cli(*_segment_args(shared_data, tiny_checkpoint, tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "█" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert 3 <= len(lines) <= 8 + 20 + 1, proc.stderr  # stages + one per 5 % + the last
    assert not any(re.search(r": : 0 ?tile", line) for line in lines), proc.stderr
    tiles = _tiles_inferred(tmp_path / "o")
    assert any(re.search(rf"inference\b.*\b{tiles}/{tiles} tiles", line) for line in lines), proc.stderr


def test_in_a_terminal_the_bar_names_stages_and_counts_tiles(
    tmp_path: Path, shared_data: Path, tiny_checkpoint
):
    """On a real pseudo-terminal: the stage names without tqdm's empty counters (``open: : 0tile``),
    and the tile counter during inference."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    proc = subprocess.Popen(
        [*fprotoseg_exe(), *_segment_args(shared_data, tiny_checkpoint, tmp_path / "o")],
        stdin=child,
        stdout=subprocess.DEVNULL,
        stderr=child,
        env={**os.environ, **CLI_ENV},
    )
    os.close(child)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            data = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(main)
    assert proc.wait(60) == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert ": :" not in screen and not re.search(r"(?<![\d.])0 ?tile", screen), screen[:2000]
    assert "open" in screen and "vectorise" in screen
    tiles = _tiles_inferred(tmp_path / "o")
    assert re.search(rf"inference\b.*{tiles}/{tiles}", screen), screen[-2000:]
