"""``fprotoseg segment --cohort FILE``: a cohort's slides with per-slide parameters, from a file.

Why a file: a study's slides come from a LIMS export or a spreadsheet, and some need what the
command line can only say for all of them: their own identifier, and their own pixel size when
the scanner did not record one (a slide without µm/px fails ``missing_mpp``; one flag ``--mpp``
for all would be wrong for the others). The file is the same shape as a ``POST /cohorts`` body's
``slides``, so one export feeds both:

- CSV with a header: ``slide`` (required), ``external_id``, ``mpp`` (optional, empty = none);
- JSON: a list of objects with those keys, or ``{"slides": [...]}``.

A relative ``slide`` is relative to the file's folder (the file travels with its slides). A
slide's ``mpp`` wins over ``--mpp``. Anything malformed is a usage error naming the line or entry,
before any slide runs.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fprotoseg.app.errors import UsageError

__all__ = ["CohortEntry", "read_cohort_file"]

COLUMNS = ("slide", "external_id", "mpp")
MAX_COHORT_FILE_BYTES = 16 * 2**20
MAX_EXTERNAL_ID_CHARS = 200


@dataclass(frozen=True)
class CohortEntry:
    """One slide of a cohort and its own parameters (None: the command line's, or none)."""

    path: Path
    external_id: str = ""
    mpp: float | None = None


def _mpp(value: Any, where: str, min_mpp: float, max_mpp: float) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise UsageError(f"{where}: mpp must be a number of µm/px, not {value!r}")
    try:
        mpp = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{where}: mpp must be a number of µm/px, not {value!r}") from None
    if not math.isfinite(mpp) or not min_mpp <= mpp <= max_mpp:
        raise UsageError(f"{where}: mpp {value} is not a plausible pixel size ({min_mpp}..{max_mpp} µm/px)")
    return mpp


def _entry(raw: dict[str, Any], where: str, folder: Path, mpp_range: tuple[float, float]) -> CohortEntry:
    unknown = sorted(set(raw) - set(COLUMNS))
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(COLUMNS)})")
    slide = raw.get("slide")
    if not isinstance(slide, str) or not slide.strip():
        raise UsageError(f"{where}: no slide path")
    external_id = raw.get("external_id")
    if external_id is None:
        external_id = ""
    if not isinstance(external_id, str | int) or isinstance(external_id, bool):
        raise UsageError(f"{where}: external_id must be text")
    external_id = str(external_id)
    if len(external_id) > MAX_EXTERNAL_ID_CHARS or any(ord(c) < 32 for c in external_id):
        raise UsageError(
            f"{where}: external_id is over {MAX_EXTERNAL_ID_CHARS} characters or holds control characters"
        )
    path = Path(slide.strip()).expanduser()
    return CohortEntry(
        path if path.is_absolute() else folder / path, external_id, _mpp(raw.get("mpp"), where, *mpp_range)
    )


def _rows(text: str, name: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, raw entry) from the file's text: JSON if it starts like JSON, else CSV."""
    if text.lstrip()[:1] in ("[", "{"):
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"{name}: not valid JSON ({exc})") from None
        if isinstance(doc, dict) and set(doc) == {"slides"}:
            doc = doc["slides"]
        if not isinstance(doc, list) or not all(isinstance(e, dict) for e in doc):
            raise UsageError(f'{name}: JSON must be a list of objects (or {{"slides": [...]}})')
        return [(f"{name}: slides[{i}]", e) for i, e in enumerate(doc)]
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in reader.fieldnames or []]
    if "slide" not in header:
        raise UsageError(
            f"{name}: the CSV header must name a 'slide' column (and optionally external_id, mpp)"
        )
    reader.fieldnames = header
    rows = []
    for row in reader:
        if None in row:
            raise UsageError(f"{name}: line {reader.line_num}: more cells than header columns")
        if not any((v or "").strip() for v in row.values()):
            continue  # a blank line
        rows.append((f"{name}: line {reader.line_num}", {k: (v or "").strip() for k, v in row.items()}))
    return rows


def read_cohort_file(path: Path, mpp_range: tuple[float, float]) -> list[CohortEntry]:
    """The cohort's entries, in the file's order; a UsageError for anything malformed (an empty
    cohort, a slide named twice, an mpp outside ``mpp_range``)."""
    try:
        if path.stat().st_size > MAX_COHORT_FILE_BYTES:
            raise UsageError(f"{path}: larger than {MAX_COHORT_FILE_BYTES // 2**20} MiB")
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the cohort file {path}: {exc}") from None
    folder = path.resolve().parent
    entries = [_entry(raw, where, folder, mpp_range) for where, raw in _rows(text, path.name)]
    if not entries:
        raise UsageError(f"{path.name}: names no slide")
    seen: dict[Path, int] = {}
    for index, entry in enumerate(entries):
        key = entry.path.resolve()
        if key in seen:
            raise UsageError(
                f"{path.name}: {entry.path} is named twice (entries {seen[key] + 1} and {index + 1})"
            )
        seen[key] = index
    return entries
