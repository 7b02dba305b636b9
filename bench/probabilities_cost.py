"""What ``outputs=probabilities`` and the viewer's QC layers cost: one slide run through the
pipeline in one process (the model loaded once, one warm-up run first), without and with
``probabilities.ome.tiff`` in turn, ``--repeats`` times each, and the viewer rendered from each result.

    python bench/probabilities_cost.py [--slide ../shared/data/slides/CMU-1-Small-Region.svs]
                                       [--checkpoint NAME|PATH] [--output-mpp 2] [--repeats 3] [--json]

Prints the median run seconds without and with (and the probabilities write alone), the share of
the run the probabilities add, the viewer's render seconds, and the file sizes. The default model
is the packaged default (CPU, fp32). Nothing is pass/fail.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"


def main() -> None:
    from fprotoseg import model
    from fprotoseg.model.catalog import resolve_checkpoint
    from fprotoseg.worker.wsi.deepzoom import write_viewer
    from fprotoseg.worker.wsi.pipeline import PipelineOptions, run

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slide", type=Path, default=SHARED / "slides" / "CMU-1-Small-Region.svs")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--output-mpp", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    segmenter = model.load_segmenter(resolve_checkpoint(args.checkpoint), device="cpu", precision="fp32")
    figures: dict[str, dict[str, float]] = {}
    samples: dict[str, list[dict[str, float]]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as tmp:
        run(args.slide, Path(tmp) / "warm-up", segmenter, options=PipelineOptions(output_mpp=args.output_mpp))
        for i in range(args.repeats):
            for asked in (False, True) if i % 2 == 0 else (True, False):
                key = "with" if asked else "without"
                out = Path(tmp) / f"{key}-{i}"
                options = PipelineOptions(output_mpp=args.output_mpp, write_probabilities=asked)
                started = time.perf_counter()
                result = run(args.slide, out, segmenter, options=options)
                total_s = time.perf_counter() - started
                manifest = json.loads(write_viewer(out, args.slide).read_text())
                samples[key].append({
                    "run_s": total_s,
                    "probabilities_write_s": result.provenance["timings_s"].get("probabilities", 0.0),
                    "viewer_render_s": manifest["render_s"],
                })
                sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
                figures[key] = {"viewer_tiles": manifest["tile_files"],
                                **{f"bytes:{name}": size for name, size in sorted(sizes.items())}}
    for key, runs in samples.items():
        for measure in ("run_s", "probabilities_write_s", "viewer_render_s"):
            figures[key][measure] = round(statistics.median(r[measure] for r in runs), 3)
    with_, without = figures["with"], figures["without"]
    summary = {
        "slide": args.slide.name,
        "model": segmenter.name,
        "output_mpp": args.output_mpp,
        "runs": figures,
        "probabilities_write_share_of_run": round(with_["probabilities_write_s"] / with_["run_s"], 4),
        "extra_run_s": round(with_["run_s"] - without["run_s"], 3),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    for name, run_figures in figures.items():
        print(f"{name} probabilities:")
        for key, value in run_figures.items():
            print(f"  {key:40s} {value}")
    print(f"probabilities write: {100 * summary['probabilities_write_share_of_run']:.1f}% of the run; "
          f"run with - without: {summary['extra_run_s']:+.2f} s")


if __name__ == "__main__":
    main()
