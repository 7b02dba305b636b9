"""One whole-slide image in, the result files README.md's "Outputs" lists out: :func:`run`.

Stages (each reported through ``progress(stage, done, total)`` and timed into provenance):
open -> tissue -> qc -> tiling -> inference (+ stitch, interleaved) -> vectorise -> write.

Why the inference loop looks like this (:mod:`fprotoseg.worker.wsi.feed`): tile reading,
decoding, resampling and stitching run in one pool of threads sized to the host's cores
(OpenSlide, OpenCV and the stitcher release the GIL), a bounded number of batches ahead of the
network, so the network never waits for I/O and memory never holds more than a few batches.
Cancellation is checked between batches.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fprotoseg.model.segmenter import Segmenter, StreamingSegmenter, cpu_batch_size, file_sha256
from fprotoseg.model.stain_norm import StainEstimate, normaliser_for
from fprotoseg.worker.errors import PipelineOptionsError
from fprotoseg.worker.wsi import outputs
from fprotoseg.worker.wsi import qc as slide_qc
from fprotoseg.worker.wsi.buffers import anonymous_array
from fprotoseg.worker.wsi.confidence import confidence_stats
from fprotoseg.worker.wsi.cpus import default_pipeline_threads
from fprotoseg.worker.wsi.dicom import MAX_SERIES_FILES, folder_sha256, series_files
from fprotoseg.worker.wsi.dicom_seg import DICOM_VENDOR, write_seg
from fprotoseg.worker.wsi.feed import Feeder
from fprotoseg.worker.wsi.pixel_maps import ProbabilityPlanes, write_artefacts_tiff, write_confidence_tiff
from fprotoseg.worker.wsi.qc_regions import MAX_SCAN_MPP
from fprotoseg.worker.wsi.result_files import (
    ARTEFACTS_NAME,
    CONFIDENCE_NAME,
    PROBABILITIES_NAME,
    QC_NAME,
    SEG_NAME,
)
from fprotoseg.worker.wsi.roi import Roi, RoiGeometry
from fprotoseg.worker.wsi.slide import Slide, open_slide
from fprotoseg.worker.wsi.stitch import LabelMapStitcher
from fprotoseg.worker.wsi.tiling import TileGrid, plan_tiles
from fprotoseg.worker.wsi.tissue import TissueMask, detect_tissue_from_saturation, saturation
from fprotoseg.worker.wsi.vectorize import absorb_small_regions, region_counts, vectorize

ProgressCallback = Callable[[str, int, int], None]
STAGES = ("open", "tissue", "qc", "tiling", "inference", "stitch", "vectorise", "write")

# The tissue thumbnail is capped in pixels so a huge slide cannot make it large.
MAX_TISSUE_THUMBNAIL_PX = 64_000_000
OVERLAY_MAX_SIDE_PX = 2048


@dataclass(frozen=True)
class PipelineOptions:
    """Knobs of one run. Units in the names; validated at construction.

    ``reader_threads``: the threads that read, decode, resample and stitch tiles; by default one
    per core this process may use (:func:`~fprotoseg.worker.wsi.cpus.default_pipeline_threads`).
    ``batch_size``: None = the segmenter's choice (from free GPU memory on CUDA; 32 on a CPU).
    """

    output_mpp: float = 2.0
    batch_size: int | None = None
    reader_threads: int = field(default_factory=default_pipeline_threads)
    prefetch_batches: int = 2
    tissue_mpp: float = 4.0
    tile_margin_px: int | None = None  # overlap per side, model px; None = ~1/8 tile
    simplify_tolerance_um: float = 1.0
    min_region_area_um2: float = 50.0
    min_tissue_area_um2: float = 10_000.0
    geojson_gzip: bool = False
    write_overlay: bool = True
    qc_policy: str = slide_qc.DEFAULT_QC_POLICY  # warn | refuse (fprotoseg.worker.wsi.qc)
    write_probabilities: bool = False  # probabilities.ome.tiff (request outputs=probabilities)

    def __post_init__(self) -> None:
        if not (0.1 <= self.output_mpp <= 100):
            raise PipelineOptionsError(f"output_mpp {self.output_mpp} µm/px is out of range (0.1..100)")
        batch_ok = self.batch_size is None or self.batch_size >= 1
        if not batch_ok or self.reader_threads < 1 or self.prefetch_batches < 1:
            raise PipelineOptionsError("batch_size, reader_threads and prefetch_batches must be >= 1")
        if self.tissue_mpp <= 0 or self.simplify_tolerance_um < 0 or self.min_region_area_um2 < 0:
            raise PipelineOptionsError("tissue_mpp must be > 0; tolerances and areas must be >= 0")
        slide_qc.check_policy(self.qc_policy)


@dataclass
class RunResult:
    """What one run wrote (``files`` by result key) and what it found."""

    out_dir: Path
    files: dict[str, Path]
    stats: dict[str, Any]
    provenance: dict[str, Any]
    tiles_inferred: int


@dataclass
class _Clock:
    """Per-stage wall times (seconds)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, dt: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + dt


def receptive_field_px(segmenter: Segmenter) -> int | None:
    """The input context one output cell sees, where the segmenter or its manifest states it (the
    segmenter's figure includes its inference options, such as the guided refinement's support)."""
    value = getattr(segmenter, "receptive_field_px", None)
    if value is None:
        value = getattr(segmenter, "manifest", {}).get("receptive_field_px")
    return int(value) if value else None


def _slide_sha256(path: Path) -> str:
    """The slide's checksum as named: a file's bytes, or a DICOM WSI folder over its instances (the
    checksum the service records for the same folder), not an IsADirectoryError."""
    if path.is_dir():
        return folder_sha256(series_files(path, MAX_SERIES_FILES), path)[0]
    return file_sha256(path)


def _noop_progress(stage: str, done: int, total: int) -> None:
    return None


def _tissue_stage(slide: Slide, options: PipelineOptions) -> tuple[TissueMask, np.ndarray]:
    """Tissue mask plus a small RGB thumbnail for the overlay, streamed chunk by chunk.

    The full-resolution thumbnail never exists: each chunk contributes its saturation (one byte
    per pixel) and its shrunken copy to the overlay thumbnail, then is dropped.
    """
    import cv2

    area_um2 = slide.width_px * slide.height_px * slide.mpp * slide.mpp
    tissue_mpp = max(options.tissue_mpp, math.sqrt(area_um2 / MAX_TISSUE_THUMBNAIL_PX))
    _, _, actual_mpp, (h, w) = slide.scaled_geometry(tissue_mpp)
    sat = anonymous_array((h, w), np.uint8)
    shrink = max(1.0, max(h, w) / OVERLAY_MAX_SIDE_PX)
    thumb = np.empty((max(1, round(h / shrink)), max(1, round(w / shrink)), 3), dtype=np.uint8)
    for y, x, chunk in slide.iter_scaled(tissue_mpp, threads=options.reader_threads):
        ch, cw = chunk.shape[:2]
        sat[y : y + ch, x : x + cw] = saturation(chunk)
        ty0, ty1 = round(y / shrink), min(thumb.shape[0], round((y + ch) / shrink))
        tx0, tx1 = round(x / shrink), min(thumb.shape[1], round((x + cw) / shrink))
        if ty1 > ty0 and tx1 > tx0:
            if (ty1 - ty0, tx1 - tx0) == (ch, cw):
                thumb[ty0:ty1, tx0:tx1] = chunk
            else:
                size = (tx1 - tx0, ty1 - ty0)
                thumb[ty0:ty1, tx0:tx1] = cv2.resize(chunk, size, interpolation=cv2.INTER_AREA)
    tissue = detect_tissue_from_saturation(
        sat, actual_mpp, min_tissue_area_um2=options.min_tissue_area_um2
    )
    return tissue, thumb


def _write_overlay(
    out_dir: Path, label_map: np.ndarray, thumbnail: np.ndarray, classes: list[Any], stats: dict[str, Any]
) -> dict[str, Path]:
    """overlay.png (the legend needs the class areas only, not the region counts)."""
    path = outputs.write_overlay_png(out_dir / outputs.OVERLAY_NAME, thumbnail, label_map, classes, stats)
    return {"overlay": path}


def batch_size_for(segmenter: Segmenter, options: PipelineOptions) -> int:
    """The batch size given, else the segmenter's own suggestion (free device memory), else the CPU
    batch for its tile size (32 tiles of 256 px, 8 of 512 px, 2 of 1024 px)."""
    if options.batch_size is not None:
        return options.batch_size
    if isinstance(segmenter, StreamingSegmenter):
        return max(1, int(segmenter.suggest_batch_size()))
    return cpu_batch_size(segmenter.tile_size_px)


def _stain_normaliser(
    segmenter: Segmenter, qc_report: slide_qc.QcReport
) -> tuple[Callable[[np.ndarray], np.ndarray] | None, dict[str, Any] | None]:
    """The model's stain normalisation for this slide, estimated once from the stained tissue the
    QC scan sampled over the whole slide (so every tile is restained alike), and what provenance
    records of it. (None, None) for a model that does not normalise; a slide QC could not estimate
    (not brightfield H&E, too little stained tissue) is read unchanged, and provenance says so."""
    manifest = getattr(segmenter, "manifest", None) or {}
    if not manifest.get("stain_norm"):
        return None, None
    samples = qc_report.scan.od_samples if qc_report.scan is not None else np.zeros((0, 3), np.float32)
    source = StainEstimate.of_od(samples)
    normaliser = normaliser_for(manifest, source)
    if normaliser is None:
        return None, {"applied": False, "reason": "the slide's stains could not be estimated"}
    recorded = {"applied": True, "source": normaliser.source.as_json(), "target": manifest["stain_norm"]}
    return normaliser, recorded


def _infer(
    slide: Slide,
    grid: TileGrid,
    segmenter: Segmenter,
    stitcher: LabelMapStitcher,
    options: PipelineOptions,
    progress: ProgressCallback,
    should_cancel: Callable[[], bool],
    pixel_transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> tuple[dict[str, float], int]:
    """Batched inference over the grid, stitched as it goes; returns (inner seconds, batch size)."""
    feeder = Feeder(
        slide,
        grid.tiles,
        grid.tile_size_px,
        segmenter,
        stitcher,
        batch_size=batch_size_for(segmenter, options),
        threads=options.reader_threads,
        prefetch_batches=options.prefetch_batches,
        progress=progress,
        should_cancel=should_cancel,
        pixel_transform=pixel_transform,
    )
    return feeder.run().as_dict(), feeder.batch_size


def run(
    slide_path: str | Path,
    out_dir: str | Path,
    segmenter: Segmenter,
    *,
    options: PipelineOptions | None = None,
    mpp_override: float | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    slide_sha256: str | None = None,
    roi: Roi | None = None,
) -> RunResult:
    """Segment one slide into ``out_dir`` (created). Raises FprotosegError subclasses on bad input.

    ``slide_sha256``: the slide's checksum when the caller already has it (the job service
    records it while the upload streams in); the slide is then never hashed again. Without it
    (the CLI) one background thread hashes the slide while the network runs.

    ``roi``: a region of interest (level-0 px); only tiles touching it are read, and the label
    map, polygons and areas are cut to it (:mod:`fprotoseg.worker.wsi.roi`).
    """
    options = options or PipelineOptions()
    progress = progress or _noop_progress
    should_cancel = should_cancel or (lambda: False)
    slide_path = Path(slide_path)
    out_dir = Path(out_dir)
    clock = _Clock()
    started = time.time()

    # One background thread hashes the slide (1 MiB at a time) while the network runs, and
    # draws the overlay while the polygons are traced.
    background = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fprotoseg-bg")
    planes: ProbabilityPlanes | None = None
    try:
        t = time.perf_counter()
        progress("open", 0, 1)
        slide = open_slide(slide_path, mpp_override=mpp_override)
        try:  # the ROI is checked (and clipped to the slide) before a pixel is read or hashed
            region = RoiGeometry.on_slide(roi, slide.width_px, slide.height_px) if roi else None
        except BaseException:
            slide.close()
            raise
        sha_job = None if slide_sha256 else background.submit(_slide_sha256, slide_path)
        with slide:
            progress("open", 1, 1)
            clock.add("open", time.perf_counter() - t)

            t = time.perf_counter()
            progress("tissue", 0, 1)
            tissue, thumbnail = _tissue_stage(slide, options)
            if region is not None:
                tissue = region.restrict_tissue(tissue, slide.mpp)
            progress("tissue", 1, 1)
            clock.add("tissue", time.perf_counter() - t)

            t = time.perf_counter()
            progress("qc", 0, 1)  # raises QcRefusedError under qc_policy=refuse, before any tile is read
            qc_report = slide_qc.run_qc(
                slide, tissue, thumbnail, segmenter, policy=options.qc_policy,
                qc_mpp=min(options.output_mpp, MAX_SCAN_MPP),
                threads=options.reader_threads,
            )
            progress("qc", 1, 1)
            clock.add("qc", time.perf_counter() - t)

            t = time.perf_counter()
            progress("tiling", 0, 1)
            grid = plan_tiles(
                slide,
                tissue,
                model_mpp=float(segmenter.mpp),
                tile_size_px=int(segmenter.tile_size_px),
                output_stride=int(segmenter.output_stride),
                output_mpp=options.output_mpp,
                margin_px=options.tile_margin_px,
                receptive_field_px=receptive_field_px(segmenter),
                cell_stride_px=getattr(segmenter, "network_stride_px", None),
            )
            progress("tiling", 1, 1)
            clock.add("tiling", time.perf_counter() - t)

            if options.write_probabilities:  # disk-backed, in the output folder
                planes = ProbabilityPlanes(out_dir, len(segmenter.classes), grid.output_shape)
            stitcher = LabelMapStitcher(
                grid.output_shape, options.output_mpp, tissue,
                probabilities=planes.array if planes is not None else None,
            )
            t = time.perf_counter()
            normaliser, stain_norm = _stain_normaliser(segmenter, qc_report)
            inner, batch_size = _infer(
                slide, grid, segmenter, stitcher, options, progress, should_cancel, normaliser
            )
            # "stitch" is the time the batch loop waited for stitching; the rest overlapped with it.
            clock.add("stitch", inner["wait_for_stitch_s"])
            clock.add("inference", time.perf_counter() - t - inner["wait_for_stitch_s"])
            progress("stitch", 1, 1)

        label_map, confidence_map = stitcher.label_map, stitcher.confidence_map
        if region is not None:
            region.clip_label_map(label_map, slide.mpp, options.output_mpp)
        artefact_map = slide_qc.exclude(label_map, qc_report, options.output_mpp)  # artefacts: not scored
        tissue_info = {
            "mpp": tissue.mpp,
            "saturation_threshold": tissue.saturation_threshold,
            "area_um2": tissue.area_um2,
        }
        del stitcher, tissue  # the tissue mask is freed before vectorisation
        classes = list(segmenter.classes)
        warnings: list[str] = qc_report.warnings()
        if not grid.tiles or not label_map.any():
            warnings.append(
                "no tissue detected: all areas are zero (blank slide, fluorescence image, or a tissue "
                "mask threshold that does not fit this stain)"
            )

        t = time.perf_counter()
        absorbed = absorb_small_regions(
            label_map, len(classes), options.min_region_area_um2 / options.output_mpp**2
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        slide_info = {
            "file": slide_path.name,
            "width": slide.width_px,
            "height": slide.height_px,
            "mpp": slide.mpp,
            "mpp_source": slide.mpp_source,
            "vendor": slide.vendor,
        }
        # Areas come from the label map (final after absorption); region counts follow below.
        stats = outputs.compute_stats(
            label_map,
            classes,
            [0] * len(classes),
            output_mpp=options.output_mpp,
            slide_info=slide_info,
            warnings=warnings,
        )
        if region is not None:
            stats["roi"] = {k: v for k, v in region.provenance(slide.mpp).items() if k != "geometry"}
        stats["qc"] = qc_report.summary()
        stats["confidence"] = confidence_stats(label_map, confidence_map, classes, options.output_mpp)
        t_maps = time.perf_counter()  # the viewer's QC layers (and QuPath's), on the label map's grid
        files: dict[str, Path] = {
            "artefacts": write_artefacts_tiff(out_dir / ARTEFACTS_NAME, artefact_map, options.output_mpp),
            "confidence": write_confidence_tiff(
                out_dir / CONFIDENCE_NAME, confidence_map, label_map, options.output_mpp
            ),
        }
        clock.add("write", time.perf_counter() - t_maps)
        t += time.perf_counter() - t_maps  # not vectorising
        del confidence_map, artefact_map
        # The overlay is drawn meanwhile, in the background thread: its temporaries are the size
        # of the thumbnail whatever the slide, and it needs only the class areas.
        overlay_job = (
            background.submit(_write_overlay, out_dir, label_map, thumbnail, classes, stats)
            if options.write_overlay
            else None
        )
        regions = vectorize(
            label_map,
            len(classes),
            output_mpp=options.output_mpp,
            level0_px_per_output_px=options.output_mpp / slide.mpp,
            slide_width_px=slide.width_px,
            slide_height_px=slide.height_px,
            simplify_tolerance_um=options.simplify_tolerance_um,
            min_region_area_um2=options.min_region_area_um2,
            progress=lambda d, n: progress("vectorise", d, n),
        )
        if region is not None:
            regions = region.clip_regions(regions, slide.mpp, options.min_region_area_um2)
        clock.add("vectorise", time.perf_counter() - t)

        t = time.perf_counter()
        progress("write", 0, 3)
        for entry, count in zip(stats["classes"], region_counts(regions, len(classes)), strict=True):
            entry["region_count"] = count
        files.update(
            outputs.write_geojson(
                out_dir, regions, classes, gzip_too=options.geojson_gzip
            )
        )
        del regions
        progress("write", 1, 3)
        # The mask after the polygons, not beside them: run concurrently, the two would hold their
        # temporaries at once (in two malloc arenas), and peak memory would grow with the slide.
        files["mask"] = outputs.write_mask_tiff(
            out_dir / outputs.MASK_NAME, label_map, classes, options.output_mpp
        )
        if planes is not None:
            t_probabilities = time.perf_counter()
            files["probabilities"] = planes.write(
                out_dir / PROBABILITIES_NAME, label_map, classes, options.output_mpp
            )
            planes.close()
            dt_probabilities = time.perf_counter() - t_probabilities
            clock.add("probabilities", dt_probabilities)  # its own stage, not part of "write"
            t += dt_probabilities
        if slide.vendor == DICOM_VENDOR:  # DICOM WSI in: the label map as a DICOM SEG too
            files["seg"] = write_seg(
                out_dir / SEG_NAME, label_map, classes, output_mpp=options.output_mpp, slide_mpp=slide.mpp,
                series=slide_path, model_name=segmenter.name, model_version=segmenter.checksum_sha256[:16],
                software_version=outputs.own_version(),
            )
        if overlay_job is not None:
            files.update(overlay_job.result())
        files["stats"] = outputs.write_json(out_dir / outputs.STATS_NAME, stats)
        files["qc"] = outputs.write_json(out_dir / QC_NAME, qc_report.as_json())
        progress("write", 2, 3)
        sha256 = slide_sha256 or (sha_job.result() if sha_job is not None else "")
        clock.add("write", time.perf_counter() - t)
    finally:
        background.shutdown(wait=True)
        if planes is not None:
            planes.close()

    provenance = outputs.build_provenance(
        slide=slide,
        slide_path=slide_path,
        slide_sha256=sha256,
        grid=grid,
        segmenter=segmenter,
        classes=classes,
        tissue_info=tissue_info,
        label_map_shape=label_map.shape,
        small_regions_absorbed=absorbed,
        options={**asdict(options), "batch_size": batch_size},
        timings_s={**clock.seconds, **inner},
        started_at_s=started,
        warnings=warnings,
        roi=region.provenance(slide.mpp) if region is not None else None,
        stain_norm=stain_norm,
    )
    files["provenance"] = outputs.write_json(out_dir / outputs.PROVENANCE_NAME, provenance)
    progress("write", 3, 3)
    return RunResult(
        out_dir=out_dir, files=files, stats=stats, provenance=provenance, tiles_inferred=len(grid.tiles)
    )
