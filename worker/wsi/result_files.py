"""The layout of one result directory: file names, media types, and how it is published.

One home for what the writer (:mod:`~fprotoseg.worker.wsi.outputs`), the job service (links,
publishing) and the API (serving files with their media type) must agree on. Stdlib only, no
numpy: the API imports it. A result directory is published by one atomic rename with a marker
written last, so a reader sees every file or none.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Final

# result key (also the URL segment /jobs/{id}/{key}) -> file name
RESULT_FILES: Final[dict[str, str]] = {
    "geojson": "segmentation.geojson",
    "stats": "stats.json",
    "mask": "mask.tiff",
    "overlay": "overlay.png",
    "provenance": "provenance.json",
    "qc": "qc.json",  # slide quality control: verdicts, values, thresholds, artefact areas
}
MEDIA_TYPES: Final[dict[str, str]] = {
    "geojson": "application/geo+json",
    "stats": "application/json",
    "mask": "image/tiff",
    "overlay": "image/png",
    "provenance": "application/json",
    "seg": "application/dicom",
    "qc": "application/json",
    "probabilities": "image/tiff",
}
# Written only for some inputs or requests (not part of a complete result set): key -> file name
OPTIONAL_RESULT_FILES: Final[dict[str, str]] = {
    "seg": "segmentation.seg.dcm",  # DICOM Segmentation, for DICOM WSI input only
    "probabilities": "probabilities.ome.tiff",  # outputs=probabilities: one uint8 channel per class
}
SEG_NAME: Final = OPTIONAL_RESULT_FILES["seg"]
PROBABILITIES_NAME: Final = OPTIONAL_RESULT_FILES["probabilities"]
# Optional outputs a request may ask for (request field ``outputs``, CLI ``--outputs``)
REQUESTABLE_OUTPUTS: Final = ("probabilities",)
# Per-pixel maps every run writes beside the mask, on its grid (OME-TIFF): what the result viewer's
# QC layers show, and what QuPath or napari open. Read by the viewer renderer, not served alone.
LAYER_FILES: Final[dict[str, str]] = {
    "artefacts": "artefacts.tiff",  # QC artefact bits (out of focus 1, pen ink 2, over-exposed 4, fold 8)
    "confidence": "confidence.tiff",  # softmax probability of the chosen class x 255; 0 = not scored
}
ARTEFACTS_NAME: Final = LAYER_FILES["artefacts"]
CONFIDENCE_NAME: Final = LAYER_FILES["confidence"]
GEOJSON_NAME: Final = RESULT_FILES["geojson"]
STATS_NAME: Final = RESULT_FILES["stats"]
MASK_NAME: Final = RESULT_FILES["mask"]
OVERLAY_NAME: Final = RESULT_FILES["overlay"]
PROVENANCE_NAME: Final = RESULT_FILES["provenance"]
QC_NAME: Final = RESULT_FILES["qc"]
GZIP_SUFFIX: Final = ".gz"  # segmentation.geojson.gz: served when the client accepts gzip
COMPLETE_MARKER: Final = ".complete.json"

# The result viewer's Deep Zoom pyramids (worker/wsi/deepzoom.py writes, the API serves them):
# viewer/viewer.json, viewer/slide.dzi + slide_files/<level>/<col>_<row>.jpeg (the slide at the
# output resolution), viewer/class_<label>.dzi + class_<label>_files/... (.png, colour + alpha).
# A class tile missing inside the pyramid is empty: the API answers it with a transparent tile.
VIEWER_DIR: Final = "viewer"
VIEWER_MANIFEST: Final = "viewer/viewer.json"
VIEWER_SLIDE_LAYER: Final = "slide"
VIEWER_TILE_PX: Final = 256
VIEWER_TILE_MEDIA_TYPES: Final[dict[str, str]] = {"jpeg": "image/jpeg", "png": "image/png"}


VIEWER_QC_LAYERS: Final = ("confidence", "artefacts")  # drawn over the classes, in this order


def viewer_class_layer(label: int) -> str:
    """The layer name of label value ``label`` (1..255; 0 is glass and has no layer)."""
    return f"class_{int(label)}"


def results_complete(result_dir: Path) -> bool:
    """True when every result file is published (the marker is written last, before the rename)."""
    return (result_dir / COMPLETE_MARKER).is_file() and all(
        (result_dir / n).is_file() for n in RESULT_FILES.values()
    )


def publish(work_dir: Path, result_dir: Path) -> None:
    """Marker last, then one atomic rename: readers never see a partial result set."""
    listing = {name: (work_dir / name).stat().st_size for name in RESULT_FILES.values()}
    (work_dir / COMPLETE_MARKER).write_text(json.dumps({"files": listing, "at": time.time()}))
    try:
        os.rename(work_dir, result_dir)
    except OSError:
        if results_complete(result_dir):  # a duplicate delivery published first: keep its files
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            shutil.rmtree(result_dir, ignore_errors=True)
            os.rename(work_dir, result_dir)
