"""Benchmark of the whole-slide pipeline: throughput against the network's own ceiling, and memory.

What it prints (nothing is pass/fail; the targets are printed beside the figures):
- end-to-end tiles/s of ``fprotoseg.worker.wsi.pipeline.run`` on a >= 16k x 16k px slide built from real H&E
  tiles (whole run, open -> write; and the inference stage alone),
- model-only tiles/s of the same network, same batch size, same torch threads, measured in the
  same process right before (the ceiling: preloaded uint8 batches, nothing else running),
- their ratio (target >= 0.90), time per stage,
- peak RSS for that slide and for one 4x larger in area, each in a fresh subprocess, beside the
  label-map sizes (target: < 1.5 GiB, growth <= the larger label map + 20%).

Usage: ``python bench/pipeline.py [--checkpoint PATH] [--side-px 16384] [--batch-size 32]``.
Default network: the packaged default model if present, else the random tiny CNN of fprotoseg.model.tiny.
Slides are written once under /tmp/fprotoseg-bench/ (real tiles from ../shared/data/patches).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHARED = Path(os.environ.get("FPROTOSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
BENCH_DIR = Path("/tmp/fprotoseg-bench")
SLIDE_MPP = 0.5
TILE_PX = 256
TEXTURE_UM = 112.0  # CRC-VAL-HE-7K tiles: 224 px at 0.5 µm/px
GLASS = np.array([242, 241, 244], dtype=np.uint8)
TEXTURE_GLOBS = ("TUM-*.png", "STR-*.png", "MUS-*.png", "NORM-*.png", "LYM-*.png", "MUC-*.png")


# ----------------------------------------------------------------------------------- slide builder
def _textures(level_mpp: float) -> np.ndarray:
    """All real texture tiles (4 rotations each), resampled to ``level_mpp``: (K, s, s, 3)."""
    import cv2
    from PIL import Image

    paths = sorted(p for g in TEXTURE_GLOBS for p in (SHARED / "patches" / "crc-val-he-7k").glob(g))
    if not paths:
        raise SystemExit(f"no real tiles under {SHARED}/patches/crc-val-he-7k (set FPROTOSEG_SHARED_DATA)")
    side = max(4, round(TEXTURE_UM / level_mpp))
    out = []
    for p in paths:
        tile = np.asarray(Image.open(p).convert("RGB"))
        tile = cv2.resize(tile, (side, side), interpolation=cv2.INTER_AREA)
        out.extend(np.ascontiguousarray(np.rot90(tile, r)) for r in range(4))
    return np.stack(out)


def _tissue(x_um: np.ndarray, y_um: np.ndarray, w_um: float, h_um: float) -> np.ndarray:
    """A large tissue section (ellipse) with a few glass lumina; the rest is glass."""
    cx, cy = w_um / 2, h_um / 2
    inside = ((x_um - cx) / (0.46 * w_um)) ** 2 + ((y_um - cy) / (0.42 * h_um)) ** 2 <= 1
    for fx, fy, fr in ((0.35, 0.4, 0.05), (0.62, 0.58, 0.07), (0.5, 0.3, 0.03)):
        inside &= (x_um - fx * w_um) ** 2 + (y_um - fy * h_um) ** 2 > (fr * w_um) ** 2
    return inside


def _tile_generator(width_px: int, height_px: int, level_mpp: float, w_um: float, h_um: float):
    tex = _textures(level_mpp)
    k, side = tex.shape[0], tex.shape[1]
    for ty in range(0, height_px, TILE_PX):
        for tx in range(0, width_px, TILE_PX):
            ys = (np.arange(ty, ty + TILE_PX) + 0.5) * level_mpp
            xs = (np.arange(tx, tx + TILE_PX) + 0.5) * level_mpp
            cell_y, cell_x = (ys // TEXTURE_UM).astype(np.int64), (xs // TEXTURE_UM).astype(np.int64)
            idx = (cell_y[:, None] * 7919 + cell_x[None, :] * 104729) % k
            py = np.minimum(((ys % TEXTURE_UM) / level_mpp).astype(np.int64), side - 1)
            px = np.minimum(((xs % TEXTURE_UM) / level_mpp).astype(np.int64), side - 1)
            tile = tex[idx, py[:, None], px[None, :]]
            tile[~_tissue(xs[None, :], ys[:, None], w_um, h_um)] = GLASS
            yield tile


def build_slide(side_px: int, levels: int = 4) -> Path:
    """A tiled JPEG pyramid of real H&E tiles, side_px x side_px at 0.5 µm/px (cached)."""
    import tifffile

    path = BENCH_DIR / f"bench-{side_px}px.tiff"
    if path.exists():
        return path
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    w_um = h_um = side_px * SLIDE_MPP
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for level in range(levels):
            scale = 2**level
            size = math.ceil(side_px / scale)
            mpp = SLIDE_MPP * scale
            tif.write(
                _tile_generator(size, size, mpp, w_um, h_um),
                shape=(size, size, 3),
                dtype=np.uint8,
                tile=(TILE_PX, TILE_PX),
                compression="jpeg",
                compressionargs={"level": 90},
                photometric="rgb",
                subfiletype=0 if level == 0 else 1,
                resolution=(1e4 / mpp, 1e4 / mpp),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
    tmp.rename(path)
    return path


# ----------------------------------------------------------------------------------- measurement
def _segmenter(checkpoint: str | None, batch_size: int):
    from fprotoseg import model
    from fprotoseg.model.tiny import write_random_tiny_checkpoint

    if checkpoint is None and model.DEFAULT_CHECKPOINT.exists():
        checkpoint = str(model.DEFAULT_CHECKPOINT)
    if checkpoint is None:
        checkpoint = str(write_random_tiny_checkpoint(BENCH_DIR / "tiny-random.safetensors"))
    return model.load_segmenter(checkpoint, device="cpu", precision="fp32"), checkpoint


def _peak_rss_bytes() -> int:
    """This process's own high-water mark (VmHWM; ru_maxrss would include the parent's across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(
    slide: Path, checkpoint: str | None, batch_size: int, reader_threads: int, torch_threads: int | None,
    out_dir: Path,
) -> dict:
    """One measurement in this (fresh) process: model-only ceiling, then the full pipeline."""
    import torch

    from fprotoseg.worker.wsi.pipeline import PipelineOptions, run
    from fprotoseg.worker.wsi.slide import open_slide
    from fprotoseg.worker.wsi.tiling import plan_tiles, read_tile
    from fprotoseg.worker.wsi.tissue import detect_tissue

    seg, ckpt = _segmenter(checkpoint, batch_size)
    if torch_threads:
        torch.set_num_threads(torch_threads)
    # Real tiles of this slide for the ceiling (read once, outside the timing).
    with open_slide(slide) as s:
        rgb, mpp = s.read_scaled(8.0)
        grid = plan_tiles(s, detect_tissue(rgb, mpp), model_mpp=seg.mpp, tile_size_px=seg.tile_size_px,
                          output_stride=seg.output_stride, output_mpp=2.0)
        step = max(1, len(grid.tiles) // batch_size)
        batch = np.stack([read_tile(s, t, seg.tile_size_px) for t in grid.tiles[::step][:batch_size]])
        del rgb
    for _ in range(2):
        seg.predict(batch)  # warm-up
    t0 = time.perf_counter()
    seg.predict(batch)
    one_batch_s = time.perf_counter() - t0
    n_batches = max(3, min(40, round(12.0 / max(one_batch_s, 1e-3))))  # about 12 s per measurement

    def ceiling() -> tuple[float, float]:
        """(tiles/s wall, tiles per CPU-second) of the bare network on preloaded batches."""
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n_batches):
            seg.predict(batch)
        tiles_done = n_batches * batch_size
        return tiles_done / (time.perf_counter() - w0), tiles_done / (time.process_time() - c0)

    # The ceiling is measured before and after the run and averaged: on a shared machine the
    # load drifts, and a single measurement on one side would bias the ratio.
    before = ceiling()
    options = PipelineOptions(batch_size=batch_size, reader_threads=reader_threads)
    # The high-water mark as each stage ends: which stage sets the peak (a stage's own growth is
    # hidden while it stays under an earlier stage's peak, as the heap is reused).
    peak_by_stage: dict[str, int] = {}
    current = {"stage": ""}

    def on_progress(stage: str, done: int, total: int) -> None:
        if stage != current["stage"]:
            if current["stage"]:
                peak_by_stage[current["stage"]] = _peak_rss_bytes()
            current["stage"] = stage

    t0, c0 = time.perf_counter(), time.process_time()
    result = run(slide, out_dir, seg, options=options, progress=on_progress)
    peak_by_stage[current["stage"]] = _peak_rss_bytes()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    after = ceiling()
    model_tps = (before[0] + after[0]) / 2
    model_tpcpu = (before[1] + after[1]) / 2
    tiles = result.provenance["tiles"]["inferred"]
    timings = result.provenance["timings_s"]
    return {
        "slide": str(slide),
        "checkpoint": ckpt,
        "model": seg.name,
        "torch_threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "reader_threads": reader_threads,
        "tiles": tiles,
        "model_only_tiles_per_s": model_tps,
        "model_only_tiles_per_s_before_after": [before[0], after[0]],
        "model_only_tiles_per_cpu_s": model_tpcpu,
        "end_to_end_tiles_per_cpu_s": tiles / cpu,
        "load_average": os.getloadavg()[0],
        "end_to_end_tiles_per_s": tiles / wall,
        "inference_stage_tiles_per_s": tiles / (timings["inference"] + timings["stitch"]),
        "wall_s": wall,
        "timings_s": timings,
        "label_map_bytes": int(np.prod(result.provenance["output"]["label_map_shape"])),
        "peak_rss_bytes": _peak_rss_bytes(),
        "peak_rss_bytes_by_stage_end": peak_by_stage,
    }


def run_child(slide: Path, args: argparse.Namespace) -> dict:
    # The worker's allocator settings (keep torch's buffers: twice as fast on CPU).
    env = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736", **os.environ,
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, __file__, "--child", str(slide), "--batch-size", str(args.batch_size),
           "--reader-threads", str(args.reader_threads)]
    if args.torch_threads:
        cmd += ["--torch-threads", str(args.torch_threads)]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _stage_line(res: dict) -> str:
    stages = ("open", "tissue", "tiling", "inference", "stitch", "vectorise", "write")
    return "time per stage (s)             " + "  ".join(
        f"{s} {res['timings_s'].get(s, 0):.2f}" for s in stages
    )


def _peak_line(res: dict) -> str:
    marks = res.get("peak_rss_bytes_by_stage_end", {})
    return "  peak RSS as each stage ended (GiB)  " + "  ".join(
        f"{stage} {v / 2**30:.3f}" for stage, v in marks.items()
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--side-px", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--reader-threads", type=int, default=2)
    ap.add_argument("--torch-threads", type=int, default=None, help="default: torch's own (= cores)")
    ap.add_argument("--skip-large", action="store_true", help="only the 16k slide (no memory-growth figure)")
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child is not None:
        out = BENCH_DIR / ("out-" + args.child.stem)
        res = child(
            args.child, args.checkpoint, args.batch_size, args.reader_threads, args.torch_threads, out
        )
        print(json.dumps(res))
        return

    t0 = time.perf_counter()
    small = build_slide(args.side_px)
    large = None if args.skip_large else build_slide(args.side_px * 2)
    print(f"slides ready in {time.perf_counter() - t0:.0f} s: {small}" + (f", {large}" if large else ""))

    a = run_child(small, args)
    gib = 1024**3
    print(f"\n== {args.side_px}x{args.side_px} px at {SLIDE_MPP} µm/px, model {a['model']}, "
          f"batch {a['batch_size']}, torch threads {a['torch_threads']}, "
          f"reader threads {a['reader_threads']}")
    print(f"tiles inferred                 {a['tiles']}")
    print(f"model-only (ceiling)           {a['model_only_tiles_per_s']:8.1f} tiles/s")
    print(f"end-to-end, whole run          {a['end_to_end_tiles_per_s']:8.1f} tiles/s   "
          f"ratio {a['end_to_end_tiles_per_s'] / a['model_only_tiles_per_s']:.3f}  (target >= 0.90)")
    print(f"end-to-end, inference stage    {a['inference_stage_tiles_per_s']:8.1f} tiles/s   "
          f"ratio {a['inference_stage_tiles_per_s'] / a['model_only_tiles_per_s']:.3f}")
    print(_stage_line(a))
    print(f"  inside inference: model {a['timings_s']['model_s']:.2f} s, waiting for tile reads "
          f"{a['timings_s']['wait_for_reads_s']:.2f} s, "
          f"for stitching {a['timings_s']['wait_for_stitch_s']:.2f} s")
    b0, b1 = a["model_only_tiles_per_s_before_after"]
    print(f"  ceiling before/after the run {b0:.1f} / {b1:.1f} tiles/s; 1-min load average "
          f"{a['load_average']:.1f} on {os.cpu_count()} CPUs")
    print(f"CPU-time view (load-independent): model-only {a['model_only_tiles_per_cpu_s']:.1f}, end-to-end "
          f"{a['end_to_end_tiles_per_cpu_s']:.1f} tiles per CPU-second, ratio "
          f"{a['end_to_end_tiles_per_cpu_s'] / a['model_only_tiles_per_cpu_s']:.3f}")
    print(f"peak RSS                       {a['peak_rss_bytes'] / gib:.3f} GiB  (target < 1.5 GiB); "
          f"label map {a['label_map_bytes'] / 2**20:.1f} MiB")
    print(_peak_line(a))
    if large is not None:
        b = run_child(large, args)
        growth = b["peak_rss_bytes"] - a["peak_rss_bytes"]
        allowed = 1.2 * b["label_map_bytes"]
        print(f"\n== {2 * args.side_px}x{2 * args.side_px} px (4x area): {b['tiles']} tiles, "
              f"model-only {b['model_only_tiles_per_s']:.1f} tiles/s, "
              f"end-to-end {b['end_to_end_tiles_per_s']:.1f} tiles/s "
              f"(ratio {b['end_to_end_tiles_per_s'] / b['model_only_tiles_per_s']:.3f}); "
              f"load average {b['load_average']:.1f}")
        print(f"peak RSS                       {b['peak_rss_bytes'] / gib:.3f} GiB; label map "
              f"{b['label_map_bytes'] / 2**20:.1f} MiB")
        print(f"RSS growth for 4x area         {growth / 2**20:.1f} MiB  vs larger label map + 20% = "
              f"{allowed / 2**20:.1f} MiB  -> {'OK' if growth <= allowed else 'OVER'}")
        print(_peak_line(b))
        print(_stage_line(b))


if __name__ == "__main__":
    main()
