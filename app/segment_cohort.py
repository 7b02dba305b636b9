"""``fprotoseg segment`` on a cohort: several slides, a folder of slides, or a glob.

Why it looks like this: a study is tens to hundreds of slides, a run is interrupted (a laptop
sleeps, a slide crashes a reader), and running it again must not redo hours of finished work.

- One folder per slide in ``--out`` (named after the slide), plus ``cohort.csv``: one row per
  slide, failed ones included (:mod:`fprotoseg.worker.wsi.cohort_table`).
- A slide's folder is published like a job's results (written aside, marker last, one rename:
  :func:`~fprotoseg.worker.wsi.result_files.publish`), so it is complete or absent.
- A second run skips a slide whose folder is complete *and* whose provenance.json records the
  same slide bytes (sha256) and the same parameters that decide the outputs
  (:class:`RunParameters`); anything else (failed, changed slide, other model or options) runs
  again. Device, precision, batch size and threads do not count: they do not change what is
  measured beyond numerical noise.
- A failing slide is recorded (its error code) and the others go on; the exit status is
  :data:`EXIT_SOME_FAILED` when any slide failed.
- The model is loaded once, and only when a slide needs it (a fully skipped run loads nothing).
- A slide may carry its own parameters (``--cohort FILE``: :mod:`fprotoseg.app.cohort_file`): its
  external id (a column of the table) and its µm/px, which wins over ``--mpp`` and is part of
  what a second run compares.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fprotoseg.app.cohort_file import CohortEntry
from fprotoseg.app.errors import UsageError
from fprotoseg.model.digest import file_sha256
from fprotoseg.model.errors import FprotosegError
from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.wsi.cohort_table import CohortRow, table_records, to_csv
from fprotoseg.worker.wsi.dicom import MAX_SERIES_FILES, folder_sha256, is_dicom_file, series_files
from fprotoseg.worker.wsi.result_files import PROVENANCE_NAME, STATS_NAME, publish, results_complete
from fprotoseg.worker.wsi.validate import TIFF_EXTENSIONS

__all__ = [
    "COHORT_TABLE_NAME",
    "EXIT_SOME_FAILED",
    "CohortSlide",
    "RunParameters",
    "cohort_slides",
    "expand_slide_args",
    "outputs_complete",
    "run_cohort",
]

COHORT_TABLE_NAME = "cohort.csv"
ID_COLUMNS = ("slide", "external_id", "path", "sha256")
# a slide failed (the others ran): the cohort's result is incomplete, which a script must notice
EXIT_SOME_FAILED = 1
# files a folder of slides contributes (a file named on the command line is taken whatever its name)
SLIDE_SUFFIXES = (*TIFF_EXTENSIONS, ".mrxs", ".vms", ".vmu", ".svslide")
SKIPPED = "skipped"  # the state of a slide whose complete outputs came from an earlier run
GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class CohortSlide:
    """A slide of the cohort, the name of its output folder in ``--out``, and its own parameters
    (None: the command line's)."""

    path: Path
    name: str
    external_id: str = ""
    mpp: float | None = None


def is_dicom_series(folder: Path) -> bool:
    """A folder holding DICOM instances directly is one slide (a DICOM WSI series)."""
    try:
        return any(e.is_file() and not e.is_symlink() and is_dicom_file(e) for e in folder.iterdir())
    except OSError:
        return False


def _slides_in_folder(folder: Path) -> list[Path]:
    """The slide files (by suffix) and DICOM series folders directly in ``folder``, by name."""
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if (entry.is_file() and entry.suffix.lower() in SLIDE_SUFFIXES) or (
            entry.is_dir() and is_dicom_series(entry)
        ):
            found.append(entry)
    return found


def expand_slide_args(args: Sequence[str]) -> tuple[list[Path], bool]:
    """(slides, cohort?): the command line's slides with folders of slides and globs expanded.

    One file or one DICOM series folder is the classic single-slide run; several arguments, a
    folder of slides or a glob (quoted, so the shell left it) make a cohort. A glob matching
    nothing and a folder without slides are usage errors; a path that does not exist is left to
    fail as a slide (one row in a cohort, the one-line error of a single run).
    """
    slides: list[Path] = []
    cohort = len(args) > 1
    for arg in args:
        path = Path(arg)
        if not path.exists() and GLOB_CHARS & set(arg):
            matches = sorted(glob.glob(arg))
            if not matches:
                raise UsageError(f"{arg!r} matches no file")
            slides.extend(Path(m) for m in matches)
            cohort = True
        elif path.is_dir() and not is_dicom_series(path):
            inside = _slides_in_folder(path)
            if not inside:
                raise UsageError(
                    f"{arg} holds no slide file ({', '.join(SLIDE_SUFFIXES)}) and no DICOM series folder"
                )
            slides.extend(inside)
            cohort = True
        else:
            slides.append(path)
    unique: dict[Path, Path] = {}
    for slide in slides:  # the same slide named twice (a glob and a folder) runs once
        unique.setdefault(slide.resolve(), slide)
    return list(unique.values()), cohort


def folder_names(slides: Sequence[Path]) -> list[CohortSlide]:
    """One output folder name per slide: its stem (``.ome.tiff`` counted as one suffix); slides that
    share a stem keep their whole file name, and slides that share that too get a short hash of
    their path. The name depends only on the slides that collide, so it is stable across runs."""

    def stem(path: Path) -> str:
        low = path.name.lower()
        for suffix in (".ome.tiff", ".ome.tif"):
            if low.endswith(suffix):
                return path.name[: -len(suffix)]
        return path.name if path.is_dir() else path.stem

    def count(names: list[str]) -> dict[str, int]:
        tally: dict[str, int] = {}
        for n in names:
            tally[n] = tally.get(n, 0) + 1
        return tally

    names = [stem(p) for p in slides]
    stems = count(names)
    names = [p.name if stems[n] > 1 else n for p, n in zip(slides, names, strict=True)]
    full = count(names)
    out = []
    for path, name in zip(slides, names, strict=True):
        if full[name] > 1:
            name = f"{name}-{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}"
        out.append(CohortSlide(path, name))
    return out


def cohort_slides(entries: Sequence[CohortEntry]) -> list[CohortSlide]:
    """The entries (command line and cohort file, in order) as cohort slides with their folder
    names; a slide named twice runs once, with the first entry's parameters."""
    unique: dict[Path, CohortEntry] = {}
    for entry in entries:
        unique.setdefault(entry.path.resolve(), entry)
    kept = list(unique.values())
    return [
        CohortSlide(named.path, named.name, entry.external_id, entry.mpp)
        for named, entry in zip(folder_names([e.path for e in kept]), kept, strict=True)
    ]


def slide_sha256(path: Path) -> str:
    """The slide's checksum as provenance.json records it (a DICOM folder over its instances)."""
    if path.is_dir():
        return folder_sha256(series_files(path, MAX_SERIES_FILES), path)[0]
    return file_sha256(path)


@dataclass(frozen=True)
class RunParameters:
    """What decides a slide's outputs, as provenance.json records it: the model's bytes, the
    pixel-size override, and the options that change areas or polygons."""

    model_sha256: str
    mpp: float | None
    output_mpp: float
    simplify_tolerance_um: float
    min_region_area_um2: float
    geojson_gzip: bool
    write_probabilities: bool = False

    def for_slide(self, slide_mpp: float | None) -> RunParameters:
        """These parameters for a slide with its own µm/px (which wins over the cohort's)."""
        return self if slide_mpp is None else replace(self, mpp=slide_mpp)

    def recorded_in(self, provenance: dict[str, Any]) -> bool:
        """Whether ``provenance`` (an earlier run's) was made with these parameters."""
        options = provenance.get("options", {})
        read = provenance.get("read", {})
        overridden = read.get("mpp_source") == "override"
        mpp_same = (not overridden) if self.mpp is None else (overridden and read.get("mpp") == self.mpp)
        return (
            provenance.get("model", {}).get("checksum_sha256") == self.model_sha256
            and mpp_same
            and options.get("output_mpp") == self.output_mpp
            and options.get("simplify_tolerance_um") == self.simplify_tolerance_um
            and options.get("min_region_area_um2") == self.min_region_area_um2
            and options.get("geojson_gzip") == self.geojson_gzip
            and bool(options.get("write_probabilities", False)) == self.write_probabilities
        )


def outputs_complete(folder: Path, sha256: str, params: RunParameters) -> bool:
    """Whether ``folder`` holds a complete earlier result of this slide with these parameters."""
    if not results_complete(folder):
        return False
    try:
        provenance = json.loads((folder / PROVENANCE_NAME).read_text())
    except (OSError, ValueError):
        return False
    return provenance.get("slide", {}).get("sha256") == sha256 and params.recorded_in(provenance)


def _stats(folder: Path) -> dict[str, Any] | None:
    try:
        stats: dict[str, Any] = json.loads((folder / STATS_NAME).read_text())
    except (OSError, ValueError):
        return None
    return stats


def _error(exc: BaseException) -> tuple[str, str]:
    """(code, one-line message) of a slide's failure; never a traceback."""
    if isinstance(exc, FprotosegError):
        return str(exc.code), exc.message
    if isinstance(exc, MemoryError):
        return ErrorCode.OUT_OF_MEMORY, "ran out of memory on the slide"
    return ErrorCode.INTERNAL_ERROR, f"internal error ({type(exc).__name__}: {str(exc)[:200]})"


# run one slide into a folder: (slide, work folder, its sha256, its µm/px override) -> tiles inferred
RunSlide = Callable[[Path, Path, str, float | None], int]


def run_cohort(
    slides: Sequence[CohortSlide],
    out_dir: Path,
    params: RunParameters,
    run_slide: RunSlide,
    *,
    announce: Callable[[int, CohortSlide], None],
    report: Callable[[str], None],
) -> list[CohortRow]:
    """Run (or skip) every slide in order; never stops at a failed one. Writes ``cohort.csv`` in
    ``out_dir`` after every slide, so an interrupted run leaves the table of what it did."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[CohortRow] = []
    total = len(slides)
    try:
        for index, slide in enumerate(slides, 1):
            announce(index, slide)
            rows.append(
                _one_slide(slide, out_dir, params, run_slide, f"[{index}/{total}] {slide.name}", report)
            )
            write_table(out_dir, rows)
    finally:
        write_table(out_dir, rows)
    return rows


def _one_slide(
    slide: CohortSlide,
    out_dir: Path,
    params: RunParameters,
    run_slide: RunSlide,
    label: str,
    report: Callable[[str], None],
) -> CohortRow:
    folder = out_dir / slide.name
    ids = {"slide": slide.name, "external_id": slide.external_id, "path": str(slide.path), "sha256": ""}
    params = params.for_slide(slide.mpp)
    started_s = time.monotonic()
    work = out_dir / f".{slide.name}.partial-{os.getpid()}"
    try:
        ids["sha256"] = sha256 = slide_sha256(slide.path)
        if outputs_complete(folder, sha256, params):
            report(f"{label}: skipped (complete outputs from an earlier run)")
            return CohortRow(ids, SKIPPED, stats=_stats(folder))
        shutil.rmtree(work, ignore_errors=True)
        tiles = run_slide(slide.path, work, sha256, params.mpp)
        if folder.exists():  # an earlier, stale or incomplete result of this slide
            shutil.rmtree(folder)
        publish(work, folder)
    except Exception as exc:
        shutil.rmtree(work, ignore_errors=True)
        code, message = _error(exc)
        report(f"{label}: failed: {code}: {message}")
        return CohortRow(ids, "failed", error_code=code, error_message=message)
    except BaseException:  # KeyboardInterrupt: nothing half-written stays behind
        shutil.rmtree(work, ignore_errors=True)
        raise
    report(f"{label}: succeeded ({tiles} tiles in {time.monotonic() - started_s:.1f} s)")
    return CohortRow(ids, "succeeded", stats=_stats(folder))


def write_table(out_dir: Path, rows: Sequence[CohortRow]) -> Path:
    """``cohort.csv``, replaced atomically (a reader never sees half a table)."""
    columns, records = table_records(rows, ID_COLUMNS)
    path = out_dir / COHORT_TABLE_NAME
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(to_csv(columns, records), encoding="utf-8")
    os.replace(tmp, path)
    return path


def remove_stale_work(out_dir: Path) -> None:
    """Work folders of runs that were killed (``.<slide>.partial-<pid>`` of a process that is gone;
    a run still going in the same folder keeps its own)."""
    for stale in out_dir.glob(".*.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True
