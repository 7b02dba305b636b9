"""Issue 24, item 2: ``fprotoseg segment`` on a cohort, as a user runs it (the console script in a
subprocess): a folder holding a real Aperio slide, a slide written here with tifffile and a broken
file; one folder per slide plus cohort.csv; a second run skips the finished slides in a fraction
of the first run's time and retries the failed one; a repaired slide then succeeds.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path

import pytest

from tests.app.live import write_mosaic_slide
from tests.test_cli_segment import RESULT_FILES, run_cli


def _cohort_args(folder_or_glob: str, out: Path, checkpoint: Path, *extra: str) -> list[str]:
    return [
        "segment",
        folder_or_glob,
        "--out",
        str(out),
        "--checkpoint",
        str(checkpoint),
        "--device",
        "cpu",
        "--batch-size",
        "16",
        *extra,
    ]


def _table(out: Path) -> dict[str, dict[str, str]]:
    rows = list(csv.DictReader(io.StringIO((out / "cohort.csv").read_text())))
    return {row["slide"]: row for row in rows}


@pytest.fixture
def cohort_folder(tmp_path: Path, shared_data: Path) -> Path:
    """CMU-1-Small-Region.svs (linked, never copied), a 2x2 mosaic of its pixels written with
    tifffile (a generic tiled TIFF), and a truncated .svs; plus a text file that is no slide."""
    folder = tmp_path / "slides"
    folder.mkdir()
    source = shared_data / "slides" / "CMU-1-Small-Region.svs"
    (folder / "CMU-1-Small-Region.svs").symlink_to(source)
    write_mosaic_slide(source, folder / "mosaic.tiff", (2, 2))
    (folder / "broken.svs").write_bytes(source.read_bytes()[:200_000])
    (folder / "notes.txt").write_text("not a slide, not picked up from a folder\n")
    return folder


def test_cohort_run_skip_and_retry(tmp_path: Path, cohort_folder: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "out"
    t0 = time.monotonic()
    first = run_cli(*_cohort_args(str(cohort_folder), out, tiny_checkpoint))
    first_s = time.monotonic() - t0
    assert first.returncode == 1, first.stderr  # one slide failed: non-zero, the others done
    assert "Traceback" not in first.stderr

    table = _table(out)
    assert set(table) == {"CMU-1-Small-Region", "mosaic", "broken"}
    broken = table["broken"]
    assert broken["state"] == "failed" and broken["error_code"] in ("corrupt_slide", "unreadable_slide")
    assert broken["tissue_area_um2"] == "" and broken["error_message"]
    assert not (out / "broken").exists()
    for name in ("CMU-1-Small-Region", "mosaic"):
        row = table[name]
        assert row["state"] == "succeeded" and row["error_code"] == ""
        for file_name in RESULT_FILES:
            assert (out / name / file_name).is_file(), (name, file_name)
        stats = json.loads((out / name / "stats.json").read_text())
        assert float(row["tissue_area_um2"]) == pytest.approx(stats["tissue_area_um2"], abs=1e-3)
        for entry in stats["classes"]:
            assert float(row[f"{entry['name']}_area_um2"]) == pytest.approx(entry["area_um2"], abs=1e-3)
            assert float(row[f"{entry['name']}_fraction"]) == pytest.approx(
                entry["fraction_of_tissue"], abs=1e-6
            )
        provenance = json.loads((out / name / "provenance.json").read_text())
        assert row["sha256"] == provenance["slide"]["sha256"]
    # the mosaic is 2x2 CMU-1-Small-Region: about four times its tissue
    ratio = float(table["mosaic"]["tissue_area_um2"]) / float(
        table["CMU-1-Small-Region"]["tissue_area_um2"]
    )
    assert 3.5 < ratio < 4.5
    # one progress stream over the slides: every line of a slide names it, tiles counted
    lines = first.stderr.splitlines()
    assert any(
        line.startswith("[1/3] CMU-1-Small-Region: inference:") and "tiles" in line for line in lines
    )
    assert any(line.startswith("[3/3] mosaic: inference:") and "tiles" in line for line in lines)
    assert "[2/3] broken: failed:" in first.stderr

    mtimes = {n: (out / n / "mask.tiff").stat().st_mtime_ns for n in ("CMU-1-Small-Region", "mosaic")}
    t0 = time.monotonic()
    second = run_cli(*_cohort_args(str(cohort_folder), out, tiny_checkpoint))
    second_s = time.monotonic() - t0
    assert second.returncode == 1, second.stderr
    table2 = _table(out)
    assert table2["CMU-1-Small-Region"]["state"] == table2["mosaic"]["state"] == "skipped"
    assert table2["broken"]["state"] == "failed"  # retried, failed again
    assert "[2/3] broken: failed:" in second.stderr
    for name in mtimes:  # untouched, and the areas in the table are still the slide's
        assert (out / name / "mask.tiff").stat().st_mtime_ns == mtimes[name]
        assert table2[name]["tissue_area_um2"] == table[name]["tissue_area_um2"]
    assert second_s < 0.5 * first_s, (first_s, second_s)

    # The broken file repaired (the same name, now a complete slide): the retry succeeds, the rest
    # stays skipped; a quoted glob names the same cohort.
    os.replace(cohort_folder / "mosaic.tiff", tmp_path / "mosaic-backup.tiff")
    (cohort_folder / "broken.svs").write_bytes((tmp_path / "mosaic-backup.tiff").read_bytes())
    os.replace(tmp_path / "mosaic-backup.tiff", cohort_folder / "mosaic.tiff")
    third = run_cli(*_cohort_args(str(cohort_folder / "*[sf]"), out, tiny_checkpoint, "--no-progress"))
    assert third.returncode == 0, third.stderr
    table3 = _table(out)
    assert table3["broken"]["state"] == "succeeded"
    assert table3["CMU-1-Small-Region"]["state"] == table3["mosaic"]["state"] == "skipped"
    assert float(table3["broken"]["tissue_area_um2"]) == pytest.approx(
        float(table["mosaic"]["tissue_area_um2"])
    )
    assert "3 slides" in third.stdout and "0 failed" in third.stdout


def test_changed_parameters_or_slide_bytes_run_again(
    tmp_path: Path, shared_data: Path, tiny_checkpoint: Path
) -> None:
    """A complete folder is reused only for the same slide bytes and output parameters."""
    from fprotoseg.app.segment_cohort import RunParameters, outputs_complete
    from fprotoseg.model.digest import file_sha256

    slide = shared_data / "slides" / "OS-1-detail.ome.tif"
    out = tmp_path / "out"
    args = [
        "segment",
        str(slide),
        str(shared_data / "slides" / "CMU-1-Small-Region.svs"),
        "--out",
        str(out),
        "--checkpoint",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--no-progress",
    ]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    folder = out / "OS-1-detail"
    sha256 = file_sha256(slide)
    same = RunParameters(file_sha256(tiny_checkpoint), None, 2.0, 1.0, 50.0, False)
    assert outputs_complete(folder, sha256, same)
    assert not outputs_complete(folder, "0" * 64, same)
    assert not outputs_complete(
        folder, sha256, RunParameters(same.model_sha256, None, 2.0, 1.0, 80.0, False)
    )
    assert not outputs_complete(
        folder, sha256, RunParameters(same.model_sha256, 0.5, 2.0, 1.0, 50.0, False)
    )
    assert not outputs_complete(folder, sha256, RunParameters("f" * 64, None, 2.0, 1.0, 50.0, False))

    # the CLI agrees: another --min-region-um2 runs both slides again
    again = run_cli(*args, "--min-region-um2", "80")
    assert again.returncode == 0, again.stderr
    assert {row["state"] for row in _table(out).values()} == {"succeeded"}
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["options"]["min_region_area_um2"] == 80.0


def test_cohort_usage_errors(tmp_path: Path, tiny_checkpoint: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no slides here\n")
    for args, expected in (
        (["segment", str(empty), "--out", str(tmp_path / "o")], "holds no slide file"),
        (["segment", str(tmp_path / "nothing-*.svs"), "--out", str(tmp_path / "o")], "matches no file"),
        (["segment", "a.svs", "b.svs"], "--out"),
    ):
        proc = run_cli(*args, "--checkpoint", str(tiny_checkpoint), "--no-progress")
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], proc.stderr


def test_cohort_file_gives_each_slide_its_own_mpp(
    tmp_path: Path, shared_data: Path, tiny_checkpoint: Path
) -> None:
    """``--cohort FILE``: TCGA-CR-7395's file records no µm/px (alone it fails missing_mpp); the
    cohort file gives it 0.25 and an external id, CMU-1-Small-Region keeps its own. The table
    carries the ids and each slide's QC codes; a second run skips both; a changed per-slide mpp
    runs that slide (and only it) again. A relative path is relative to the file, not the cwd."""
    slides = shared_data / "slides"
    study = tmp_path / "study"
    study.mkdir()
    (study / "CMU-1-Small-Region.svs").symlink_to(slides / "CMU-1-Small-Region.svs")
    cohort_csv = study / "study.csv"
    cohort_csv.write_text(
        "slide,external_id,mpp\r\n"
        f"{slides / 'TCGA-CR-7395-01A-01-TS1.svs'},CASE-7395,0.25\r\n"
        "CMU-1-Small-Region.svs,CASE-CMU,\r\n"
    )
    out = tmp_path / "out"
    args = ["segment", "--cohort", str(cohort_csv), "--out", str(out), "--checkpoint", str(tiny_checkpoint),
            "--device", "cpu", "--no-progress"]
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    table = _table(out)
    tcga, cmu = table["TCGA-CR-7395-01A-01-TS1"], table["CMU-1-Small-Region"]
    assert (tcga["external_id"], cmu["external_id"]) == ("CASE-7395", "CASE-CMU")
    assert tcga["state"] == cmu["state"] == "succeeded"
    read = json.loads((out / "TCGA-CR-7395-01A-01-TS1" / "provenance.json").read_text())["read"]
    assert read["mpp"] == 0.25 and read["mpp_source"] == "override"
    cmu_read = json.loads((out / "CMU-1-Small-Region" / "provenance.json").read_text())["read"]
    assert cmu_read["mpp_source"] != "override"
    for name, row in table.items():
        stats = json.loads((out / name / "stats.json").read_text())
        assert row["qc_warnings"] == ";".join(stats["qc"]["codes"])
        assert float(row["tissue_area_um2"]) == pytest.approx(stats["tissue_area_um2"], abs=1e-3)

    second = run_cli(*args)
    assert second.returncode == 0, second.stderr
    assert {row["state"] for row in _table(out).values()} == {"skipped"}

    cohort_csv.write_text(cohort_csv.read_text().replace(",0.25", ",0.5"))
    third = run_cli(*args)
    assert third.returncode == 0, third.stderr
    table3 = _table(out)
    assert table3["TCGA-CR-7395-01A-01-TS1"]["state"] == "succeeded"
    assert table3["CMU-1-Small-Region"]["state"] == "skipped"
    # twice the pixel size: four times the area of the same pixels
    ratio = float(table3["TCGA-CR-7395-01A-01-TS1"]["tissue_area_um2"]) / float(tcga["tissue_area_um2"])
    assert 3.6 < ratio < 4.4


def test_cohort_file_refusals(tmp_path: Path, shared_data: Path, tiny_checkpoint: Path) -> None:
    """A malformed cohort file is one line and exit status 2, before any slide runs."""
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    cases = {
        "unknown.csv": (f"slide,stain\n{slide},HE\n", "unknown field(s) stain"),
        "nompp.csv": (f"slide,mpp\n{slide},fast\n", "line 2: mpp must be a number"),
        "tiny.csv": (f"slide,mpp\n{slide},0.0001\n", "not a plausible pixel size"),
        "twice.json": (json.dumps([{"slide": str(slide)}, {"slide": str(slide), "mpp": 0.5}]), "named twice"),
        "noslide.csv": ("external_id,mpp\nA,0.5\n", "'slide' column"),
        "empty.json": ("[]", "names no slide"),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        proc = run_cli("segment", "--cohort", str(tmp_path / name), "--out", str(tmp_path / "o"),
                       "--checkpoint", str(tiny_checkpoint), "--no-progress")
        assert proc.returncode == 2, (name, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (name, proc.stderr)
    assert not (tmp_path / "o").exists()
