"""``fprotoseg segment SLIDE...``: slides in, the result files of README.md's "Outputs" out.

One slide: the slide is opened and vetted before the model is loaded, so a bad file fails in
milliseconds with a one-line reason. Several slides, a folder of slides or a glob: a cohort
(:mod:`fprotoseg.app.segment_cohort`): one folder per slide plus cohort.csv, finished slides
skipped on a second run, failed ones recorded and retried. torch, OpenSlide and the pipeline are
imported inside the handler only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from fprotoseg.app.segment_cohort import EXIT_SOME_FAILED, expand_slide_args
from fprotoseg.worker.wsi.result_files import REQUESTABLE_OUTPUTS


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "segment",
        help="segment whole-slide images into QuPath GeoJSON, µm² statistics, a mask and an overlay",
        description=(
            "Segment one whole-slide image, or a cohort of them. Writes segmentation.geojson (QuPath "
            "import), stats.json (per-class areas in µm²), mask.tiff, overlay.png and provenance.json "
            "into --out; for several slides (or a folder of slides, or a quoted glob) one folder per "
            "slide plus cohort.csv (one row per slide, failed ones included). A second run skips "
            "slides whose outputs are complete for the same slide bytes and parameters, and retries "
            f"failed ones; the exit status is {EXIT_SOME_FAILED} when any slide failed."
        ),
    )
    p.add_argument(
        "slides",
        nargs="*",
        metavar="SLIDE",
        help="slide file (SVS, NDPI, MIRAX, SCN, OME-TIFF, tiled TIFF, ...) or a DICOM WSI series: its "
        "folder or one of its instances; several, a folder of slides, or a glob ('slides/*.svs') make "
        "a cohort",
    )
    p.add_argument(
        "--cohort",
        type=Path,
        default=None,
        metavar="FILE",
        help="a cohort with per-slide parameters: CSV with columns slide, external_id, mpp (or JSON: "
        "a list of such objects); relative paths are relative to the file; a slide's mpp wins over --mpp",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: ./<slide name>/; required for a cohort)",
    )
    p.add_argument(
        "--checkpoint",
        type=str,
        default=None,
        help="a model name (as GET /models lists them: packaged or in $FPROTOSEG_MODELS_DIR) or a "
        ".safetensors path (default: $FPROTOSEG_CHECKPOINT, else the packaged default model)",
    )
    p.add_argument(
        "--mpp", type=float, default=None,
        help="level-0 µm/px, overriding the slide metadata (in a cohort: for slides without their own)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="default: $FPROTOSEG_DEVICE, else auto (a GPU where one exists)")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                   help="default: $FPROTOSEG_PRECISION, else fp16 on CUDA, fp32 on CPU")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="tiles per network call (default: from free GPU memory; on a CPU 32, 8 of 512 px, 2 of 1024 px)",
    )
    p.add_argument(
        "--output-mpp", type=float, default=2.0, help="µm/px of the label map and polygons (default 2.0)"
    )
    p.add_argument(
        "--reader-threads",
        type=int,
        default=None,
        help="threads reading, decoding and stitching tiles (default: $FPROTOSEG_PIPELINE_THREADS, "
        "else one per available core)",
    )
    p.add_argument(
        "--num-threads", type=int, default=None, help="CPU threads for the network (default: torch's)"
    )
    p.add_argument("--simplify-um", type=float, default=1.0, help="polygon simplification tolerance in µm")
    p.add_argument("--min-region-um2", type=float, default=50.0, help="drop regions smaller than this (µm²)")
    p.add_argument("--geojson-gzip", action="store_true", help="also write segmentation.geojson.gz")
    p.add_argument(
        "--roi",
        type=Path,
        default=None,
        metavar="FILE",
        help="a region of interest: GeoJSON Polygon/MultiPolygon, Feature or FeatureCollection in level-0 "
        "pixels (as QuPath exports annotations); only tiles touching it are inferred, outputs and areas "
        "are cut to it",
    )
    p.add_argument(
        "--qc-policy",
        choices=("warn", "refuse"),
        default=None,
        help="slide QC: warn (print the QC codes, exit 0) or refuse (stop before inference with the QC "
        "code's exit status, 65); default: $FPROTOSEG_QC_POLICY, else warn",
    )
    p.add_argument(
        "--outputs",
        choices=REQUESTABLE_OUTPUTS,
        default=None,
        help="an optional output besides the standard files: probabilities = probabilities.ome.tiff, one "
        "uint8 channel per class (probability x 255) at --output-mpp, pyramidal OME-TIFF",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in scripts)")
    p.set_defaults(handler=handle)


def default_out_dir(slide: Path) -> Path:
    """``./<slide name>/``; for a DICOM folder named from where it lies, ``./<name> results/``
    (the results must not land among the series' own instances)."""
    name = slide.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return Path.cwd() / name[: -len(suffix)]
    out = Path.cwd() / (slide.name if slide.is_dir() else slide.stem)
    if out.resolve() == slide.resolve():
        out = out.with_name(f"{out.name} results")
    return out


_INFERENCE_FORMAT = (
    "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} tiles [{elapsed}<{remaining}, {rate_fmt}]"
)


class _Bar:
    """Progress on stderr. On a terminal a tqdm bar: the stage name (with its step count where it
    has several), and tiles done/total with tiles/s during inference. In a log (no terminal) plain
    lines: one per stage, and during inference one per 5 % of the tiles or per 10 s at most, so a
    batch job's log is not one line per batch. In a cohort the one bar serves every slide:
    ``prefix`` names the slide (``[3/12] CMU-1: ``) before the stage, and :meth:`message` prints a
    slide's outcome above the bar."""

    LOG_STEP = 0.05  # fraction of the tiles between two log lines
    LOG_INTERVAL_S = 10.0  # ... or this long, whichever comes first

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._enabled = enabled
        self._tty = enabled and self._stream.isatty()
        self._stage = ""
        self.prefix = ""  # the slide being segmented, in a cohort
        self._bar: Any = None
        self._logged_step = -1
        self._logged_s = 0.0
        self._started_s = 0.0
        if self._tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=None, bar_format="{desc}", unit="tile", file=self._stream, dynamic_ncols=True
            )

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self._enabled:
            return
        changed = stage != self._stage
        self._stage = stage
        if self._bar is not None:
            self._draw(stage, done, total, changed)
        elif stage == "inference":
            self._log_tiles(done, total, changed)
        elif changed:
            self._line(stage)

    def _draw(self, stage: str, done: int, total: int, changed: bool) -> None:
        bar = self._bar
        if stage == "inference":
            if changed:
                bar.bar_format = _INFERENCE_FORMAT
                bar.set_description_str(self.prefix + stage, refresh=False)
                bar.reset(total=total)
            bar.update(done - bar.n)
            if done == total:
                bar.refresh()  # the last count is drawn even inside tqdm's minimum interval
            return
        if changed:
            bar.bar_format = "{desc}"
        bar.set_description_str(self.prefix + (f"{stage} {done}/{total}" if total > 1 else stage))

    def _log_tiles(self, done: int, total: int, changed: bool) -> None:
        now_s = time.monotonic()
        if changed:
            self._started_s, self._logged_step = now_s, -1
        step = int(done / total / self.LOG_STEP) if total else 0  # the last one: done == total
        if step <= self._logged_step and now_s - self._logged_s < self.LOG_INTERVAL_S:
            return
        self._logged_step, self._logged_s = step, now_s
        elapsed_s = now_s - self._started_s
        rate = f", {done / elapsed_s:.1f} tiles/s" if done and elapsed_s > 0 else ""
        percent = 100 * done / total if total else 100.0
        self._line(f"inference: {done}/{total} tiles ({percent:.0f}%{rate})")

    def _line(self, text: str) -> None:
        print(self.prefix + text, file=self._stream, flush=True)

    def message(self, text: str) -> None:
        """One line that stays (a slide's outcome), above the bar on a terminal; the next slide's
        stages start afresh."""
        self._stage = ""
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def handle(args: argparse.Namespace) -> int:
    from fprotoseg.app.cohort_file import CohortEntry, read_cohort_file
    from fprotoseg.app.errors import UsageError
    from fprotoseg.worker.wsi.slide import MAX_MPP, MIN_MPP, open_slide

    if not args.slides and args.cohort is None:
        raise UsageError("name a slide (or several, a folder, a glob) or give --cohort FILE")
    slides, cohort = expand_slide_args(args.slides) if args.slides else ([], True)
    entries = [CohortEntry(path) for path in slides]
    if args.cohort is not None:
        entries += read_cohort_file(args.cohort, (MIN_MPP, MAX_MPP))
        cohort = True
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if args.reader_threads is not None and args.reader_threads < 1:
        raise UsageError("--reader-threads must be >= 1")
    if args.mpp is not None and not MIN_MPP <= args.mpp <= MAX_MPP:
        raise UsageError(
            f"--mpp {args.mpp} is not a plausible pixel size (expected {MIN_MPP}..{MAX_MPP} µm/px)"
        )
    if cohort:
        if args.out is None:
            raise UsageError("several slides need --out: the folder for one folder per slide and cohort.csv")
        if args.roi is not None:
            raise UsageError("--roi is in one slide's level-0 pixels: give it with one slide")
        return _handle_cohort(args, entries)
    slide = slides[0]
    # Vet the slide (and the ROI on it) first: a bad file fails before the (slower) model load.
    roi = None
    with open_slide(slide, mpp_override=args.mpp) as opened:
        if args.roi is not None:
            from fprotoseg.worker.wsi.roi import RoiGeometry, load_roi_file

            roi = load_roi_file(args.roi)
            RoiGeometry.on_slide(roi, opened.width_px, opened.height_px)

    from fprotoseg.worker.wsi.pipeline import run

    checkpoint, options = _checkpoint_and_options(args)
    segmenter = _load_segmenter(args, checkpoint)
    out_dir = args.out or default_out_dir(slide)
    bar = _Bar(enabled=not args.no_progress)
    t0 = time.perf_counter()
    try:
        result = run(
            slide, out_dir, segmenter, options=options, mpp_override=args.mpp, progress=bar, roi=roi
        )
    finally:
        bar.close()
    elapsed = time.perf_counter() - t0
    _print_summary(result, elapsed)
    return 0


def _checkpoint_and_options(args: argparse.Namespace) -> tuple[Path, Any]:
    """The checkpoint file and the pipeline options: flags win; unset ones come from the same
    Settings the service reads (FPROTOSEG_CHECKPOINT, ...)."""
    from fprotoseg.model.catalog import resolve_checkpoint
    from fprotoseg.worker.service.settings import load_settings
    from fprotoseg.worker.wsi.pipeline import PipelineOptions

    settings = load_settings()
    # a path or a model name (UnknownModelError lists the known names)
    checkpoint = resolve_checkpoint(args.checkpoint or settings.checkpoint, settings.models_dir)
    options = PipelineOptions(
        output_mpp=args.output_mpp,
        batch_size=args.batch_size if args.batch_size is not None else settings.batch_size,
        reader_threads=args.reader_threads or settings.pipeline_threads,
        simplify_tolerance_um=args.simplify_um,
        min_region_area_um2=args.min_region_um2,
        geojson_gzip=args.geojson_gzip,
        qc_policy=args.qc_policy or settings.qc_policy,
        write_probabilities=args.outputs == "probabilities",
    )
    return checkpoint, options


def _load_segmenter(args: argparse.Namespace, checkpoint: Path) -> Any:
    from fprotoseg import model
    from fprotoseg.model.segmenter import choose_device_and_precision
    from fprotoseg.worker.service.settings import load_settings

    settings = load_settings()
    device, precision = choose_device_and_precision(
        args.device or settings.device, args.precision or settings.precision
    )
    return model.load_segmenter(checkpoint, device=device, precision=precision, num_threads=args.num_threads)


def _handle_cohort(args: argparse.Namespace, entries: list[Any]) -> int:
    """Every slide into its folder under --out, cohort.csv beside them; a failed slide never stops
    the others, and makes the exit status EXIT_SOME_FAILED. A slide's own mpp (--cohort FILE) wins
    over --mpp."""
    from fprotoseg.app.segment_cohort import (
        SKIPPED,
        RunParameters,
        cohort_slides,
        remove_stale_work,
        run_cohort,
    )
    from fprotoseg.model.digest import file_sha256
    from fprotoseg.worker.wsi.pipeline import run

    checkpoint, options = _checkpoint_and_options(args)
    params = RunParameters(
        model_sha256=file_sha256(checkpoint),
        mpp=args.mpp,
        output_mpp=options.output_mpp,
        simplify_tolerance_um=options.simplify_tolerance_um,
        min_region_area_um2=options.min_region_area_um2,
        geojson_gzip=options.geojson_gzip,
        write_probabilities=options.write_probabilities,
    )
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_work(out_dir)
    named = cohort_slides(entries)
    bar = _Bar(enabled=not args.no_progress)
    segmenter: list[Any] = []  # loaded at the first slide that runs

    def run_slide(path: Path, work: Path, sha256: str, mpp: float | None) -> int:
        if not segmenter:
            segmenter.append(_load_segmenter(args, checkpoint))
        result = run(
            path, work, segmenter[0], options=options, mpp_override=mpp, progress=bar,
            slide_sha256=sha256,
        )
        return result.tiles_inferred

    def announce(index: int, slide: Any) -> None:
        bar.prefix = f"[{index}/{len(named)}] {slide.name}: "

    t0 = time.perf_counter()
    try:
        rows = run_cohort(named, out_dir, params, run_slide, announce=announce, report=bar.message)
    finally:
        bar.close()
    failed = [r for r in rows if r.state == "failed"]
    skipped = sum(r.state == SKIPPED for r in rows)
    print(
        f"{len(rows)} slides in {time.perf_counter() - t0:.1f} s: {len(rows) - len(failed) - skipped} "
        f"segmented, {skipped} skipped (complete), {len(failed)} failed"
    )
    for row in failed:
        print(f"  failed: {row.ids['path']}: {row.error_code}: {row.error_message}")
    print(f"results in {out_dir}/ (one folder per slide, cohort.csv)")
    return EXIT_SOME_FAILED if failed else 0


def _print_summary(result: Any, elapsed_s: float) -> None:
    stats, prov = result.stats, result.provenance
    tiles = prov["tiles"]
    print(
        f"{stats['slide']['file']}: {stats['slide']['width']}x{stats['slide']['height']} px at "
        f"{stats['slide']['mpp']:.4g} µm/px ({stats['slide']['mpp_source']}), "
        f"{tiles['inferred']} tiles in {elapsed_s:.1f} s "
        f"on {prov['model']['device']}/{prov['model']['precision']}"
    )
    if "roi" in stats:
        print(f"region of interest: {stats['roi']['area_um2'] / 1e6:.3f} mm² (areas below are within it)")
    print(f"tissue: {stats['tissue_area_mm2']:.3f} mm²")
    qc = stats.get("qc")
    if qc:
        codes = f" ({', '.join(qc['codes'])})" if qc["codes"] else ""
        excluded_mm2 = qc["excluded_area_um2"] / 1e6
        excluded = f", {excluded_mm2:.3f} mm² of artefacts not scored" if excluded_mm2 else ""
        print(f"QC: {qc['verdict']}{codes}{excluded}")
    for c in stats["classes"]:
        print(
            f"  {c['name']:<14} {c['area_um2'] / 1e6:10.4f} mm²  {100 * c['fraction_of_tissue']:5.1f}%  "
            f"{c['region_count']} region(s)"
        )
    for w in stats.get("warnings", []):
        print(f"warning: {w}")
    print(f"results in {result.out_dir}/")
    for key, path in sorted(result.files.items()):
        print(f"  {key:<11} {path.name}")
