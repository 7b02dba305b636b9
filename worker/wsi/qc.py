"""Slide quality control: is this a slide the model may answer for, and which areas must it not score?

Why: a fluorescence or IHC slide, a slide stained unlike the training slides, or one scanned
coarser than the model reads, goes through the network all the same and comes back with
confident-looking class areas. This stage runs after the tissue mask and before any tile is
read for the network, on the low-resolution thumbnail (brightfield H&E or not) and one pass at
about the output µm/px (:mod:`~fprotoseg.worker.wsi.qc_regions`: stain vectors, per-region
artefacts). Each check has a stable code from the registry; the policy decides what it does:

- ``warn`` (default): the job runs; the codes are in ``stats.json``'s warnings and ``qc.json``,
- ``refuse``: the first failed check ends the job with its code (:class:`QcRefusedError`) before
  inference.

The stain range a slide is compared with is measured from the model's training crops by
``bench/stain_range.py`` and stored beside the checkpoint (``<checkpoint stem>.qc.json`` in the
packaged weights folder); a model without one gets the stain check ``skipped``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from fprotoseg.model.stain_norm import MIN_SAMPLES as STAIN_MIN_SAMPLES
from fprotoseg.model.stain_norm import stain_vectors
from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.errors import PipelineOptionsError, QcRefusedError
from fprotoseg.worker.wsi import qc_regions
from fprotoseg.worker.wsi.slide import Slide
from fprotoseg.worker.wsi.tissue import TissueMask

QC_POLICIES: Final = ("warn", "refuse")
DEFAULT_QC_POLICY: Final = "warn"
QC_REFERENCE_SUFFIX: Final = ".qc.json"

# --- brightfield H&E or not (on the thumbnail) ---------------------------------------------------
DARK_LUMINANCE = 50  # a pixel this dark is background in fluorescence, rare in brightfield
FLUORESCENCE_MIN_DARK_FRACTION = 0.5
FOREGROUND_MIN_OD = 0.3  # summed RGB optical density: below it a pixel is glass
GREYSCALE_MAX_SATURATION = 20  # median HSV saturation of the foreground
DAB_HUE = (5, 30)  # OpenCV hue (0..180): orange-brown DAB; eosin is pink-red, haematoxylin violet-blue
DAB_MIN_SATURATION = 40
IHC_MIN_DAB_FRACTION = 0.2
MIN_FOREGROUND_PX = 200

# --- the slide's own scan resolution against the model's ----------------------------------------
MAX_UPSAMPLE = 1.25  # the network may see pixels at most this much enlarged from the scan

# --- artefacts -------------------------------------------------------------------------------------
ARTEFACT_MAX_FRACTION = 0.25  # of the tissue area

# --- stain vectors: Macenko's, the same estimate the model's stain normalisation uses (one home) ---


def check_policy(policy: str) -> str:
    """``policy`` if it is one of :data:`QC_POLICIES` (the options, settings and CLI share it)."""
    if policy not in QC_POLICIES:
        raise PipelineOptionsError(f"qc_policy {policy!r} is not one of {', '.join(QC_POLICIES)}")
    return policy


@dataclass
class Check:
    """One slide-level verdict: ``passed`` None = not assessed (``skipped`` says why)."""

    name: str
    code: ErrorCode
    passed: bool | None
    message: str
    values: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "code": str(self.code),
            "passed": self.passed,
            "message": self.message,
            "values": self.values,
            "thresholds": self.thresholds,
        }


@dataclass
class QcReport:
    """Everything QC found; ``scan`` is None when the per-region pass did not run."""

    policy: str
    checks: list[Check]
    scan: qc_regions.RegionScan | None
    seconds: float = 0.0
    excluded_output_um2: float = 0.0

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.passed is False]

    @property
    def verdict(self) -> str:
        return "pass" if not self.failed else ("refused" if self.policy == "refuse" else "warn")

    def warnings(self) -> list[str]:
        """One line per failed check, starting with its code (what a LIMS keys on)."""
        return [f"{c.code}: {c.message}" for c in self.failed]

    def artefact_areas_um2(self) -> dict[str, float]:
        return dict(self.scan.area_um2) if self.scan is not None else {}

    def summary(self) -> dict[str, Any]:
        """What ``stats.json`` carries (``qc.json`` has the values and thresholds)."""
        return {
            "verdict": self.verdict,
            "policy": self.policy,
            "codes": [str(c.code) for c in self.failed],
            "artefact_area_um2": self.artefact_areas_um2(),
            "excluded_area_um2": self.excluded_output_um2,
        }

    def as_json(self) -> dict[str, Any]:
        scan = self.scan
        return {
            **self.summary(),
            "checks": {c.name: c.as_json() for c in self.checks},
            "regions": None
            if scan is None
            else {
                "mpp": scan.mpp,
                "tissue_area_um2": scan.tissue_px * scan.mpp * scan.mpp,
                "focus_reference": scan.focus_reference,
                "focus_threshold": scan.focus_threshold,
                "thresholds": qc_regions.thresholds(),
            },
            "seconds": self.seconds,
        }


# ------------------------------------------------------------------------------ brightfield check
def brightfield_check(thumbnail_rgb: np.ndarray) -> Check:
    """Brightfield H&E or fluorescence / IHC (DAB-dominant) / greyscale, from colour statistics.

    Fluorescence: most of the image is dark (the background emits nothing). Greyscale: the
    foreground has no colour. IHC: a large share of the foreground is DAB brown, a hue H&E lacks.
    """
    import cv2

    lum = cv2.cvtColor(thumbnail_rgb, cv2.COLOR_RGB2GRAY)
    dark_fraction = float(np.count_nonzero(lum < DARK_LUMINANCE)) / max(1, lum.size)
    od_sum = -np.log(np.maximum(thumbnail_rgb, 1).astype(np.float32) / 255.0).sum(axis=2)
    fg = od_sum > FOREGROUND_MIN_OD
    hsv = cv2.cvtColor(thumbnail_rgb, cv2.COLOR_RGB2HSV)
    hue, sat = hsv[..., 0][fg], hsv[..., 1][fg]
    n_fg = int(hue.size)
    median_sat = float(np.median(sat)) if n_fg else 0.0
    dab = (hue >= DAB_HUE[0]) & (hue <= DAB_HUE[1]) & (sat >= DAB_MIN_SATURATION)
    dab_fraction = float(np.count_nonzero(dab)) / n_fg if n_fg else 0.0
    values = {
        "dark_fraction": round(dark_fraction, 4),
        "foreground_fraction": round(n_fg / max(1, lum.size), 4),
        "foreground_median_saturation": median_sat,
        "dab_fraction": round(dab_fraction, 4),
    }
    thresholds = {
        "fluorescence_min_dark_fraction": FLUORESCENCE_MIN_DARK_FRACTION,
        "dark_luminance": DARK_LUMINANCE,
        "greyscale_max_saturation": GREYSCALE_MAX_SATURATION,
        "ihc_min_dab_fraction": IHC_MIN_DAB_FRACTION,
        "dab_hue": list(DAB_HUE),
    }
    if dark_fraction > FLUORESCENCE_MIN_DARK_FRACTION:
        kind = "fluorescence"
    elif n_fg < MIN_FOREGROUND_PX:
        kind = "no_tissue"
    elif median_sat < GREYSCALE_MAX_SATURATION:
        kind = "greyscale"
    elif dab_fraction > IHC_MIN_DAB_FRACTION:
        kind = "ihc_dab"
    else:
        kind = "brightfield_he"
    values["kind"] = kind
    passed = kind in ("brightfield_he", "no_tissue")
    message = (
        "brightfield H&E"
        if kind == "brightfield_he"
        else "no foreground to judge"
        if kind == "no_tissue"
        else f"the slide looks like {kind.replace('_', ' ')}, not brightfield H&E; the model's "
        "classes mean nothing on it"
    )
    return Check("brightfield_he", ErrorCode.NOT_BRIGHTFIELD_HE, passed, message, values, thresholds)


# ----------------------------------------------------------------------------------- stain vectors
def angle_deg(u: Any, v: Any) -> float:
    """The angle between two vectors in degrees."""
    u, v = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    cos = float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
    return math.degrees(math.acos(max(-1.0, min(1.0, cos))))


def reference_path(checkpoint: Path) -> Path:
    """Where the stain range of ``checkpoint`` lies: beside it, ``<stem>.qc.json``."""
    return checkpoint.with_name(checkpoint.stem + QC_REFERENCE_SUFFIX)


def find_reference(segmenter: Any) -> dict[str, Any] | None:
    """The stain range measured for this network (matched by the checkpoint's sha256, else by its
    manifest name), from its own folder or the packaged weights; None if it has none."""
    from fprotoseg.model.catalog import PACKAGED_WEIGHTS_DIR

    folders = {PACKAGED_WEIGHTS_DIR}
    path = getattr(segmenter, "checkpoint_path", None)
    if path:
        folders.add(Path(path).parent)
    checksum = getattr(segmenter, "checksum_sha256", None)
    name = getattr(segmenter, "name", None)
    by_name = None
    for folder in sorted(folders):
        for candidate in sorted(folder.glob("*" + QC_REFERENCE_SUFFIX)):
            try:
                doc = json.loads(candidate.read_text())
            except (OSError, ValueError):
                continue
            if checksum and doc.get("checkpoint_sha256") == checksum:
                return {**doc, "file": candidate.name, "matched_by": "checkpoint_sha256"}
            if name and doc.get("manifest_name") == name and by_name is None:
                by_name = {**doc, "file": candidate.name, "matched_by": "manifest_name"}
    return by_name


def stain_check(od_samples: np.ndarray, reference: dict[str, Any] | None) -> Check:
    """The slide's stain vectors against the range measured on the model's training crops."""
    code = ErrorCode.STAIN_OUT_OF_RANGE
    if reference is None:
        return Check("stain", code, None, "skipped: the model has no stain range beside its checkpoint")
    vectors = stain_vectors(od_samples)
    if vectors is None:
        return Check("stain", code, None, f"skipped: fewer than {STAIN_MIN_SAMPLES} stained tissue pixels")
    values: dict[str, Any] = {}
    thresholds: dict[str, Any] = {"reference": reference.get("file"), "measured_at_mpp": reference.get("mpp")}
    out = []
    for stain, vec in zip(("haematoxylin", "eosin"), vectors, strict=True):
        ref = reference["stains"][stain]
        angle = angle_deg(vec, ref["mean"])
        values[stain] = {
            "vector": [round(float(v), 4) for v in vec],
            "angle_to_reference_deg": round(angle, 2),
        }
        thresholds[stain] = {"reference": ref["mean"], "max_angle_deg": ref["max_angle_deg"]}
        if angle > ref["max_angle_deg"]:
            out.append(f"{stain} {angle:.1f}° from the training stain (at most {ref['max_angle_deg']:.1f}°)")
    passed = not out
    message = "within the training range" if passed else "stain outside the training range: " + "; ".join(out)
    return Check("stain", code, passed, message, values, thresholds)


def mpp_check(slide_mpp: float, model_mpp: float) -> Check:
    """The scan must resolve at least what the model reads (up to :data:`MAX_UPSAMPLE`)."""
    limit = model_mpp * MAX_UPSAMPLE
    passed = slide_mpp <= limit
    message = (
        f"scanned at {slide_mpp:.3g} µm/px, the model reads {model_mpp:.3g} µm/px"
        if passed
        else f"scanned at {slide_mpp:.3g} µm/px, coarser than the model's {model_mpp:.3g} µm/px allows "
        f"(at most {limit:.3g}): the network would see enlarged pixels"
    )
    return Check(
        "mpp",
        ErrorCode.MPP_OUTSIDE_MODEL_RANGE,
        passed,
        message,
        {"slide_mpp": slide_mpp, "model_mpp": model_mpp},
        {"max_slide_mpp": limit},
    )


def artefact_check(scan: qc_regions.RegionScan | None) -> Check:
    code = ErrorCode.ARTEFACT_AREA_HIGH
    if scan is None:
        return Check("artefacts", code, None, "skipped: not a brightfield H&E slide")
    tissue_um2 = scan.tissue_px * scan.mpp * scan.mpp
    fraction = scan.area_um2["any"] / tissue_um2 if tissue_um2 else 0.0
    passed = fraction <= ARTEFACT_MAX_FRACTION
    flagged = ", ".join(f"{k} {v / 1e6:.3f} mm²" for k, v in scan.area_um2.items() if k != "any" and v > 0)
    message = (
        f"{100 * fraction:.1f}% of the tissue has artefacts ({flagged or 'none'})"
        if passed
        else f"{100 * fraction:.1f}% of the tissue has artefacts ({flagged}), more than "
        f"{100 * ARTEFACT_MAX_FRACTION:.0f}%"
    )
    return Check(
        "artefacts",
        code,
        passed,
        message,
        {"artefact_fraction_of_tissue": round(fraction, 4), "area_um2": scan.area_um2},
        {"max_fraction_of_tissue": ARTEFACT_MAX_FRACTION},
    )


# ----------------------------------------------------------------------------------------- stage
def _enforce(report: QcReport) -> None:
    if report.policy == "refuse" and report.failed:
        first = report.failed[0]
        raise QcRefusedError(first.code, f"slide QC refused the slide ({first.code}): {first.message}")


def run_qc(
    slide: Slide,
    tissue: TissueMask,
    thumbnail_rgb: np.ndarray,
    segmenter: Any,
    *,
    policy: str,
    qc_mpp: float,
    threads: int = 1,
) -> QcReport:
    """The QC stage: checks, artefact map; raises :class:`QcRefusedError` under ``refuse``.

    A slide that is not brightfield H&E is refused (or warned about) without the per-region pass:
    stain vectors and artefacts have no meaning on it.
    """
    started = time.perf_counter()
    check_policy(policy)
    bright = brightfield_check(thumbnail_rgb)
    model_mpp = float(getattr(segmenter, "manifest", {}).get("domain", {}).get("mpp") or segmenter.mpp)
    report = QcReport(policy, [bright, mpp_check(slide.mpp, model_mpp)], None)
    _enforce(report)
    if bright.passed and bright.values["kind"] == "brightfield_he":
        report.scan = qc_regions.scan_regions(slide, tissue, qc_mpp, threads=threads)
        report.checks.insert(1, stain_check(report.scan.od_samples, find_reference(segmenter)))
    report.checks.append(artefact_check(report.scan))
    report.seconds = time.perf_counter() - started
    _enforce(report)
    return report


def exclude(label_map: np.ndarray, report: QcReport, output_mpp: float) -> np.ndarray:
    """Leave the artefact areas out of the label map (label 0) before areas and polygons are taken;
    records the tissue excluded at the output resolution, and returns the artefact map on the
    label map's grid (all zero when the region pass did not run) for ``artefacts.tiff``."""
    shape = label_map.shape
    if report.scan is None:
        return qc_regions.artefacts_at_output(np.zeros((0, 0), np.uint8), shape, output_mpp, 1.0)
    on_output = qc_regions.artefacts_at_output(report.scan.artefacts, shape, output_mpp, report.scan.mpp)
    px = qc_regions.exclude_artefacts(label_map, on_output)
    report.scan.artefacts = np.zeros((0, 0), np.uint8)  # freed: the map on the output grid carries it
    report.excluded_output_um2 = px * output_mpp * output_mpp
    return on_output
