"""Draw the slide-QC picture of the docs: CMU-1-Small-Region with its right half blurred and two
marker strokes drawn on (as tests/worker/test_qc.py builds it), and the artefact map QC found.

    python bench/qc_picture.py [--out docs/img/qc_report.png]

Left: the slide as QC read it. Right: the same with out-of-focus areas in yellow and pen ink in
magenta, and the verdicts of qc.json written under it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"


def main() -> None:
    import cv2
    from PIL import Image, ImageDraw

    from fprotoseg.worker.wsi.deepzoom import ARTEFACT_COLOURS_RGB
    from fprotoseg.worker.wsi.pipeline import PipelineOptions, _tissue_stage
    from fprotoseg.worker.wsi.qc import run_qc
    from fprotoseg.worker.wsi.qc_regions import ARTEFACT_BITS
    from fprotoseg.worker.wsi.slide import open_slide
    from tests.stubs import ChannelStubSegmenter, write_pyramid_tiff

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "qc_report.png")
    args = ap.parse_args()

    with open_slide(SHARED / "slides" / "CMU-1-Small-Region.svs") as slide:
        rgb = slide.read_level(0, 0, 0, slide.width_px, slide.height_px)
    half = rgb.shape[1] // 2
    rgb[:, half:] = cv2.GaussianBlur(np.ascontiguousarray(rgb[:, half:]), (0, 0), 4.0)
    strokes = np.zeros(rgb.shape[:2], np.uint8)
    cv2.polylines(strokes, [np.array([[200, 300], [900, 700], [1700, 600]], np.int32)], False, 1, 300)
    cv2.polylines(strokes, [np.array([[300, 2200], [1200, 2500], [2000, 2100]], np.int32)], False, 2, 300)
    out = rgb.astype(np.float32)
    for value, ink in ((1, (40, 160, 70)), (2, (30, 70, 190))):
        out[strokes == value] *= np.array(ink, np.float32) / 255.0
    with tempfile.TemporaryDirectory() as tmp:
        path = write_pyramid_tiff(Path(tmp) / "qc.tiff", out.astype(np.uint8), 0.499, 2)
        options = PipelineOptions(reader_threads=2)
        with open_slide(path) as slide:
            tissue, _ = _tissue_stage(slide, options)
            report = run_qc(slide, tissue, _, ChannelStubSegmenter(), policy="warn", qc_mpp=2.0, threads=2)
            view, _ = slide.read_scaled(report.scan.mpp if report.scan else 2.0)
    assert report.scan is not None
    artefacts = report.scan.artefacts[: view.shape[0], : view.shape[1]]
    marked = view.astype(np.float32)
    for name, colour in ARTEFACT_COLOURS_RGB.items():
        hit = (artefacts & ARTEFACT_BITS[name]) != 0
        marked[hit] = 0.45 * marked[hit] + 0.55 * np.array(colour, np.float32)
    h, w = view.shape[:2]
    canvas = Image.new("RGB", (2 * w + 10, h + 70), "white")
    canvas.paste(Image.fromarray(view), (0, 0))
    canvas.paste(Image.fromarray(marked.astype(np.uint8)), (w + 10, 0))
    draw = ImageDraw.Draw(canvas)
    areas = report.scan.area_um2
    codes = ", ".join(str(c.code) for c in report.failed) or "-"
    draw.text((4, h + 6), f"QC verdict: {report.verdict}  codes: {codes}", fill="black")
    draw.text((4, h + 24), f"out of focus (yellow) {areas['out_of_focus'] / 1e6:.3f} mm2   "
              f"pen ink (magenta) {areas['pen_ink'] / 1e6:.3f} mm2", fill="black")
    draw.text((4, h + 42), f"QC {report.seconds:.2f} s at {report.scan.mpp:.2f} um/px", fill="black")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.quantize(colors=96).save(args.out, optimize=True)  # a small file in the repository
    print(f"written: {args.out} ({canvas.size[0]}x{canvas.size[1]})")


if __name__ == "__main__":
    main()
