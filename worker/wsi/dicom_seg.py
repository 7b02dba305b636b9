"""``segmentation.seg.dcm``: the label map as a DICOM Segmentation of a DICOM WSI input (highdicom).

Why: hospital viewers and PACS take DICOM, not our palette TIFF. For a slide that came in as a
DICOM WSI series the result goes back as a SEG instance in the same study that references the
source series: the same frame of reference, its level-0 image as the source image, the slide
coordinate system, and a total pixel matrix at the label map's resolution (``output_mpp``) placed
on the slide by pixel spacing and origin, so a viewer lays it over the slide where it belongs.
One segment per class (its name, its colour as CIELab), BINARY, tiled (256 px frames, empty
frames omitted: a mostly-glass slide stores little).

Geometry: output pixel ``j`` covers level-0 µm ``[j * output_mpp, (j + 1) * output_mpp)`` (see
:mod:`fprotoseg.worker.wsi.tiling`), so its centre lies at the source's pixel index
``(k - 1) / 2 + j * k`` with ``k = output_mpp / mpp``; the SEG's origin is that point of the source
image in slide coordinates, and its spacing ``k`` times the source's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fprotoseg.worker.errors import DicomSeriesError
from fprotoseg.worker.wsi.dicom import MAX_SERIES_FILES, series_files

if TYPE_CHECKING:
    import numpy as np
    from pydicom import Dataset

__all__ = ["DICOM_VENDOR", "SEG_TILE_PX", "level0_source", "write_seg"]

DICOM_VENDOR = "dicom"  # Slide.vendor of a DICOM WSI (OpenSlide's vendor name)
SEG_TILE_PX = 256
SEG_SERIES_NUMBER = 900  # a derived series: numbered apart from the scanner's
WSI_STORAGE = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
CONTENT_LABEL = "FPROTOSEG"
# SNOMED CT "Tissue": each segment is a tissue class the model names (SegmentLabel carries it)
TISSUE_CODE = ("85756007", "SCT", "Tissue")


def level0_source(series: Path) -> Dataset:
    """The series' full-resolution VOLUME image (the largest total pixel matrix), header only."""
    import pydicom

    folder = series if series.is_dir() else series.parent
    best: Dataset | None = None
    for path in series_files(folder, MAX_SERIES_FILES):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.get("SOPClassUID") != WSI_STORAGE or "VOLUME" not in list(ds.get("ImageType", [])):
            continue
        size = int(ds.TotalPixelMatrixRows) * int(ds.TotalPixelMatrixColumns)
        if best is None or size > int(best.TotalPixelMatrixRows) * int(best.TotalPixelMatrixColumns):
            best = ds
    if best is None:
        raise DicomSeriesError(f"the DICOM series in {folder.name} has no whole-slide VOLUME image")
    return best


def _segments(classes: Sequence[Any], model_name: str, model_version: str) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    tissue = Code(*TISSUE_CODE)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=model_name[:64], family=codes.cid7162.ArtificialIntelligence, version=model_version[:64]
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=k + 1,
            segment_label=str(cls.name)[:64],
            segmented_property_category=tissue,
            segmented_property_type=tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(*(int(v) for v in cls.color)),
        )
        for k, cls in enumerate(classes)
    ]


def write_seg(
    path: Path,
    label_map: np.ndarray,
    classes: Sequence[Any],
    *,
    output_mpp: float,
    slide_mpp: float,
    series: Path,
    model_name: str,
    model_version: str,
    software_version: str,
) -> Path:
    """Write the SEG of ``label_map`` (0 = background, k + 1 = class k) over the series' level 0."""
    import highdicom as hd
    import numpy as np
    from highdicom.spatial import PixelToReferenceTransformer

    source = level0_source(series)
    shared = source.SharedFunctionalGroupsSequence[0]
    measures = shared.PixelMeasuresSequence[0]
    row_mm, col_mm = (float(v) for v in measures.PixelSpacing)
    k = output_mpp / slide_mpp  # source pixels per label-map pixel
    origin = source.TotalPixelMatrixOriginSequence[0]
    to_slide = PixelToReferenceTransformer(
        image_position=(
            float(origin.XOffsetInSlideCoordinateSystem),
            float(origin.YOffsetInSlideCoordinateSystem),
            float(origin.get("ZOffsetInSlideCoordinateSystem", 0.0)),
        ),
        image_orientation=[float(v) for v in source.ImageOrientationSlide],
        pixel_spacing=(row_mm, col_mm),
    )
    # the transformer takes whole pixel indices only: its affine, at the fractional (column, row)
    first_centre = (to_slide.affine @ np.array([(k - 1) / 2, (k - 1) / 2, 0.0, 1.0]))[:3]
    pixel_measures = hd.PixelMeasuresSequence(
        pixel_spacing=(row_mm * k, col_mm * k),
        slice_thickness=float(measures.get("SliceThickness", 0.0) or 0.0) or None,
    )
    position = hd.PlanePositionSequence(
        coordinate_system=hd.CoordinateSystemNames.SLIDE,
        image_position=[float(v) for v in first_centre],
        pixel_matrix_position=(1, 1),
    )
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=np.ascontiguousarray(label_map)[None],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segments(classes, model_name, model_version),
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="fprotoseg",
        manufacturer_model_name=model_name[:64],
        software_versions=software_version[:64],
        device_serial_number=model_version[:64],
        content_label=CONTENT_LABEL,
        content_description="tissue classes",
        pixel_measures=pixel_measures,
        plane_positions=[position],
        tile_pixel_array=True,
        tile_size=(SEG_TILE_PX, SEG_TILE_PX),
        omit_empty_frames=True,
    )
    if "PatientOrientation" not in seg:
        # General Image, type 2C: present (empty) where no patient orientation applies, as on a
        # slide (dciodvfy reports its absence as an error)
        seg.PatientOrientation = ""
    tmp = path.with_name(path.name + ".tmp")
    seg.save_as(tmp)
    os.replace(tmp, path)
    return path
