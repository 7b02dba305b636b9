"""The cohort table: one row per slide of a cohort, failed slides included.

Why one module: the CLI's ``cohort.csv`` and the service's ``GET /cohorts/{id}/stats.csv`` (and
``.json``) are read by the same spreadsheets and scripts, so they share one column layout:

    <identifier columns...>, state, error_code, error_message, qc_warnings, tissue_area_um2,
    <class>_area_um2, <class>_fraction   (for each class, in the model's order)

``qc_warnings`` is the slide's QC codes from its ``stats.json`` (``qc.codes``, joined by ``;``
in the CSV, a list in the JSON): a slide that ran under ``qc_policy=warn`` despite a QC finding
is told apart from a clean one without opening its folder. A slide QC refused has no stats: its
QC code is its ``error_code``.

The identifier columns are the caller's (the CLI: slide folder, path, sha256; the service: job
id, external id, file name, sha256). Areas come from the slide's ``stats.json``; a slide without
one (failed, still running) has empty area cells, never zeros, so a failure cannot pass as a
slide without tissue. Stdlib only: the API imports it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CohortRow",
    "class_names",
    "qc_codes",
    "table_columns",
    "table_json",
    "table_records",
    "to_csv",
]

QC_COLUMN = "qc_warnings"
COMMON_COLUMNS = ("state", "error_code", "error_message", QC_COLUMN, "tissue_area_um2")
QC_SEPARATOR = ";"


@dataclass
class CohortRow:
    """One slide: its identifiers (ordered, the caller's columns), its state, and its stats.json
    once it has one."""

    ids: dict[str, str]
    state: str
    error_code: str = ""
    error_message: str = ""
    stats: dict[str, Any] | None = field(default=None, repr=False)


def qc_codes(stats: dict[str, Any] | None) -> list[str] | None:
    """The QC codes a slide's stats.json records ([] for a clean slide); None without stats (failed,
    still running) or from a version without QC, so "no warning" is never claimed unseen."""
    if stats is None or not isinstance(stats.get("qc"), dict):
        return None
    return [str(code) for code in stats["qc"].get("codes", [])]


def class_names(rows: Sequence[CohortRow]) -> list[str]:
    """Every class name in the rows' stats, in the order first met (the model's order)."""
    names: list[str] = []
    for row in rows:
        for entry in (row.stats or {}).get("classes", []):
            if entry["name"] not in names:
                names.append(entry["name"])
    return names


def table_columns(id_columns: Sequence[str], classes: Sequence[str]) -> list[str]:
    """The header: identifiers, the common columns, then area and fraction per class."""
    per_class = [col for name in classes for col in (f"{name}_area_um2", f"{name}_fraction")]
    return [*id_columns, *COMMON_COLUMNS, *per_class]


def table_records(
    rows: Sequence[CohortRow], id_columns: Sequence[str]
) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, one flat dict per row): numbers as numbers, a missing value as None."""
    classes = class_names(rows)
    columns = table_columns(id_columns, classes)
    records = []
    for row in rows:
        record: dict[str, Any] = {col: row.ids.get(col, "") for col in id_columns}
        record.update(
            state=row.state,
            error_code=row.error_code or None,
            error_message=row.error_message or None,
            tissue_area_um2=None,
        )
        codes = qc_codes(row.stats)
        record[QC_COLUMN] = None if codes is None else QC_SEPARATOR.join(codes)
        for name in classes:
            record[f"{name}_area_um2"] = record[f"{name}_fraction"] = None
        if row.stats is not None:
            record["tissue_area_um2"] = float(row.stats["tissue_area_um2"])
            for entry in row.stats.get("classes", []):
                record[f"{entry['name']}_area_um2"] = float(entry["area_um2"])
                record[f"{entry['name']}_fraction"] = float(entry["fraction_of_tissue"])
        records.append(record)
    return columns, records


def to_csv(columns: Sequence[str], records: Sequence[dict[str, Any]]) -> str:
    """RFC 4180 CSV (header first); None is an empty cell, areas keep 3 decimals, fractions 6."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    for record in records:
        writer.writerow([_cell(col, record.get(col)) for col in columns])
    return out.getvalue()


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}" if column.endswith("_fraction") else f"{value:.3f}"
    return str(value)


def table_json(rows: Sequence[CohortRow], id_columns: Sequence[str]) -> dict[str, Any]:
    """The same table as JSON: the class names, and per slide its identifiers, state, error and
    areas (``classes``: name -> area_um2 and fraction_of_tissue; absent without stats)."""
    classes = class_names(rows)
    slides = []
    for row in rows:
        entry: dict[str, Any] = {**{col: row.ids.get(col, "") for col in id_columns}, "state": row.state}
        entry["error"] = (
            {"code": row.error_code, "message": row.error_message} if row.error_code else None
        )
        entry[QC_COLUMN] = qc_codes(row.stats)
        entry["tissue_area_um2"] = float(row.stats["tissue_area_um2"]) if row.stats is not None else None
        entry["classes"] = (
            {
                c["name"]: {
                    "area_um2": float(c["area_um2"]),
                    "fraction_of_tissue": float(c["fraction_of_tissue"]),
                }
                for c in row.stats.get("classes", [])
            }
            if row.stats is not None
            else None
        )
        slides.append(entry)
    return {"classes": classes, "slides": slides}
