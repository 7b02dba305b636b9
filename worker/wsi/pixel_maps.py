"""The per-pixel result files beside ``mask.tiff``, on the label map's grid: ``artefacts.tiff``
(what slide QC left out, a bit per artefact), ``confidence.tiff`` (the chosen class's softmax
probability) and, when asked for, ``probabilities.ome.tiff`` (every class's).

Why files and not only numbers in ``stats.json``: a reviewer wants to see *where* QC excluded
tissue and where the network was unsure (the result viewer's QC layers are rendered from these
two files), and QuPath or napari overlay them on the slide at the right scale. All three are
written by the one OME-TIFF writer (:func:`~fprotoseg.worker.wsi.outputs.write_ome_pyramid`).

Memory: the class probabilities are collected by the stitcher into a disk-backed memmap (a file
unlinked at once, in the output folder), one byte per class per output pixel, and written plane by
plane: never a float array of the slide, nor C bytes per output pixel of resident memory.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fprotoseg.worker.wsi.outputs import ome_xml, own_version, write_ome_pyramid
from fprotoseg.worker.wsi.qc_regions import ARTEFACT_BITS

ARTEFACT_BITS_NAMESPACE = "fprotoseg/qc/artefact-bits"  # MapAnnotation: bit value -> artefact name
PROBABILITY_SCALE = 255  # a stored value v means probability v / 255


def _creator() -> str:
    return f"fprotoseg {own_version()}"


def _zero_unscored(plane: np.ndarray, label_map: np.ndarray, rows_per_band: int = 256) -> None:
    """In place: 0 wherever the label map is 0 (glass, QC-excluded, outside the ROI)."""
    for r0 in range(0, label_map.shape[0], rows_per_band):
        band = plane[..., r0 : r0 + rows_per_band, :]
        band[..., label_map[r0 : r0 + rows_per_band] == 0] = 0


def write_artefacts_tiff(path: Path, artefacts: np.ndarray, output_mpp: float) -> Path:
    """``artefacts.tiff``: uint8 bits of :data:`~fprotoseg.worker.wsi.qc_regions.ARTEFACT_BITS`
    (a pixel may carry several), their names in a MapAnnotation."""
    description = ome_xml(
        artefacts.shape, output_mpp, image_name="fprotoseg QC artefacts", channel_names=["artefacts"],
        annotations={ARTEFACT_BITS_NAMESPACE: {bit: name for name, bit in ARTEFACT_BITS.items()}},
        creator=_creator(),
    )
    return write_ome_pyramid(path, [artefacts], description, output_mpp)


def write_confidence_tiff(
    path: Path, confidence_map: np.ndarray, label_map: np.ndarray, output_mpp: float
) -> Path:
    """``confidence.tiff``: the chosen class's softmax probability x 255 where the label map
    scores tissue, 0 elsewhere (``confidence_map`` is zeroed there in place)."""
    _zero_unscored(confidence_map, label_map)
    description = ome_xml(
        confidence_map.shape, output_mpp, image_name="fprotoseg confidence", channel_names=["confidence"],
        creator=_creator(),
    )
    return write_ome_pyramid(path, [confidence_map], description, output_mpp)


class ProbabilityPlanes:
    """uint8 (C, h, w) class probabilities x 255, disk-backed, for the stitcher to fill.

    The file lives in ``folder`` (the output folder: room for the results is room for this) and is
    unlinked at once, so nothing is left behind when a run fails; :meth:`close` frees it.
    """

    def __init__(self, folder: Path, n_classes: int, shape: tuple[int, int]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(dir=folder, prefix=".probabilities-")  # noqa: SIM115 (closed by close())
        self.array: np.ndarray | None = np.memmap(self._file, dtype=np.uint8, mode="w+",
                                                  shape=(n_classes, *shape))

    def write(self, path: Path, label_map: np.ndarray, classes: Sequence[Any], output_mpp: float) -> Path:
        """``probabilities.ome.tiff``: one channel per class, named after it; 0 where the label
        map is 0. Not changed by small-region absorption: these are the network's own numbers."""
        assert self.array is not None
        _zero_unscored(self.array, label_map)
        description = ome_xml(
            label_map.shape, output_mpp, image_name="fprotoseg class probabilities",
            channel_names=[c.name for c in classes], creator=_creator(),
        )
        return write_ome_pyramid(path, list(self.array), description, output_mpp)

    def close(self) -> None:
        self.array = None  # the memmap goes with its last reference
        self._file.close()
