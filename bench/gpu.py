"""How fast fprotoseg runs on this host: tiles/s per precision and batch size, and seconds per slide.

For a lab sizing a GPU host (or checking a new one): it times the network through the same seam the
worker uses (``model.load_segmenter(...).predict(uint8 NHWC)``, so host->device copy, normalisation,
autocast and the copy of the scores back are all included) for fp32, fp16 and bf16 at batch sizes
16..256, then runs one whole slide end to end through ``fprotoseg.worker.wsi.pipeline.run``. It prints tables;
ratios are to fp32 at the same batch size. Nothing is asserted: speed depends on the machine.

Without a CUDA GPU it says so and measures the CPU instead (fp32 and bf16; fp16 is GPU-only), with
small batches and a time budget per cell so that it ends in about a minute.

    python bench/gpu.py                              # packaged model (else a random tiny CNN)
    python bench/gpu.py --checkpoint /models/x.safetensors --slide /data/big.svs
    python bench/gpu.py --quick                      # a few seconds (CI runs this on the CPU)
    docker compose run --rm worker python /opt/fprotoseg/bench/gpu.py --slide /data/uploads/...
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# glibc returns torch's large CPU buffers to the OS after every forward pass unless told not to
# (about half the CPU speed); it reads these only at start-up, hence the re-exec in main().
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = REPO_ROOT.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
GPU_BATCH_SIZES = (16, 32, 64, 128, 256)
CPU_BATCH_SIZES = (4, 16)
STAGES = ("open", "tissue", "tiling", "inference", "stitch", "vectorise", "write")


@dataclass(frozen=True)
class Plan:
    """What to measure and for how long. Per cell: warm-up, then batches until both ``min_iters``
    and ``min_seconds`` are reached, or ``max_seconds`` has passed (bounds a slow model)."""

    device: str
    precisions: tuple[str, ...]
    batch_sizes: tuple[int, ...]
    warmup_iters: int
    min_iters: int
    min_seconds: float
    max_seconds: float


@dataclass
class Cell:
    precision: str
    batch_size: int
    tiles_per_s: float | None = None
    ms_per_batch: float | None = None
    peak_mib: float | None = None
    note: str = ""


@dataclass
class EndToEnd:
    precision: str
    batch_size: int
    seconds: float | None = None
    tiles: int | None = None
    timings_s: dict[str, float] | None = None
    note: str = ""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="model checkpoint (default: the packaged model, else a random tiny CNN)")
    p.add_argument("--slide", type=Path, default=None,
                   help=f"slide for the end-to-end run (default: {DEFAULT_SLIDE} if present)")
    p.add_argument("--no-slide", action="store_true", help="skip the end-to-end run")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--precisions", default=None, help="comma-separated, e.g. fp16,bf16")
    p.add_argument("--batch-sizes", default=None, help="comma-separated, e.g. 64,128")
    p.add_argument("--min-seconds", type=float, default=None, help="least timed seconds per cell")
    p.add_argument("--quick", action="store_true",
                   help="one tiny batch per precision and a short slide run: seconds, for CI")
    return p.parse_args(argv)


def make_plan(device: str, args: argparse.Namespace, *, bf16_ok: bool) -> Plan:
    if device == "cuda":
        plan = Plan("cuda", ("fp32", "fp16", "bf16") if bf16_ok else ("fp32", "fp16"),
                    GPU_BATCH_SIZES, warmup_iters=3, min_iters=10, min_seconds=1.0, max_seconds=10.0)
    else:
        plan = Plan("cpu", ("fp32", "bf16"), CPU_BATCH_SIZES,
                    warmup_iters=1, min_iters=2, min_seconds=2.0, max_seconds=6.0)
    if args.quick:
        plan = Plan(plan.device, plan.precisions, (2,) if device == "cpu" else (16,),
                    warmup_iters=1, min_iters=1, min_seconds=0.0, max_seconds=1.0)
    precisions = tuple(args.precisions.split(",")) if args.precisions else plan.precisions
    if device == "cpu" and "fp16" in precisions:
        print("note: fp16 is GPU-only; skipped on the CPU")
        precisions = tuple(p for p in precisions if p != "fp16")
    batches = tuple(int(b) for b in args.batch_sizes.split(",")) if args.batch_sizes else plan.batch_sizes
    min_seconds = plan.min_seconds if args.min_seconds is None else args.min_seconds
    return Plan(plan.device, precisions, batches, plan.warmup_iters, plan.min_iters,
                min_seconds, max(plan.max_seconds, min_seconds))


def resolve_checkpoint(arg: Path | None, tmp: Path) -> tuple[Path, str]:
    """The checkpoint to time and a line saying what it is (a random network is said to be one)."""
    from fprotoseg.model import DEFAULT_CHECKPOINT

    if arg is not None:
        return arg, str(arg)
    if DEFAULT_CHECKPOINT.exists():
        return DEFAULT_CHECKPOINT, f"packaged default ({DEFAULT_CHECKPOINT.name})"
    from fprotoseg.model.networks.tiny import write_random_tiny_checkpoint

    path = write_random_tiny_checkpoint(tmp / "tiny-random.safetensors")
    return path, "random tiny CNN (the packaged model is not installed: speeds are not the product's)"


def time_predict(segmenter: Any, tiles: Any, plan: Plan, sync: Callable[[], None]) -> tuple[float, float]:
    """(tiles/s, ms per batch) of ``segmenter.predict`` on one batch, after warm-up."""
    for _ in range(plan.warmup_iters):
        segmenter.predict(tiles)
    sync()
    n = 0
    start = time.perf_counter()
    while True:
        segmenter.predict(tiles)
        n += 1
        sync()
        elapsed = time.perf_counter() - start
        if (n >= plan.min_iters and elapsed >= plan.min_seconds) or elapsed >= plan.max_seconds:
            break
    return n * len(tiles) / elapsed, 1000.0 * elapsed / n


def measure(checkpoint: Path, plan: Plan) -> tuple[list[Cell], dict[str, Any]]:
    """Throughput cells for every precision x batch size; returns the loaded segmenters too."""
    import numpy as np
    import torch

    from fprotoseg import model

    cuda = plan.device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    cells: list[Cell] = []
    segmenters: dict[str, Any] = {}
    rng = np.random.default_rng(0)
    for precision in plan.precisions:
        segmenter = model.load_segmenter(checkpoint, device=plan.device, precision=precision)
        segmenters[precision] = segmenter
        size = int(segmenter.tile_size_px)
        for batch in plan.batch_sizes:
            cell = Cell(precision, batch)
            tiles = rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                cell.tiles_per_s, cell.ms_per_batch = time_predict(segmenter, tiles, plan, sync)
                if cuda:
                    cell.peak_mib = torch.cuda.max_memory_allocated() / 2**20
            except torch.cuda.OutOfMemoryError:
                cell.note = "out of GPU memory"
                torch.cuda.empty_cache()
            cells.append(cell)
            print(f"  measured {precision} batch {batch}: "
                  f"{cell.tiles_per_s or 0:.1f} tiles/s {cell.note}".rstrip(), file=sys.stderr)
    return cells, segmenters


def end_to_end(slide: Path, segmenter: Any, batch_size: int, out_dir: Path) -> EndToEnd:
    """Seconds for one slide through the real pipeline (open, tissue, tiles, network, stitch, write)."""
    result = EndToEnd(str(segmenter.precision), batch_size)
    try:
        from fprotoseg.worker.wsi import pipeline
    except ImportError as exc:
        result.note = f"fprotoseg.worker.wsi.pipeline not available ({exc})"
        return result
    options = pipeline.PipelineOptions(batch_size=batch_size)
    start = time.perf_counter()
    run = pipeline.run(slide, out_dir, segmenter, options=options)
    result.seconds = time.perf_counter() - start
    prov = run.provenance or {}
    result.tiles = (prov.get("tiles") or {}).get("inferred")
    result.timings_s = prov.get("timings_s")
    return result


def _fmt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def print_throughput(cells: list[Cell], plan: Plan) -> None:
    fp32 = {c.batch_size: c.tiles_per_s for c in cells if c.precision == "fp32" and c.tiles_per_s}
    print("\nthroughput: Segmenter.predict on uint8 tiles (x fp32 = ratio to fp32 at the same batch)")
    header = f"{'precision':<10}{'batch':>6}{'tiles/s':>11}{'ms/batch':>10}"
    header += f"{'peak MiB':>10}" if plan.device == "cuda" else ""
    print(header + f"{'x fp32':>8}  note")
    for c in cells:
        ratio = c.tiles_per_s / fp32[c.batch_size] if c.tiles_per_s and c.batch_size in fp32 else None
        line = f"{c.precision:<10}{c.batch_size:>6}{_fmt(c.tiles_per_s, '.1f'):>11}"
        line += f"{_fmt(c.ms_per_batch, '.1f'):>10}"
        line += f"{_fmt(c.peak_mib, '.0f'):>10}" if plan.device == "cuda" else ""
        print(line + f"{_fmt(ratio, '.2f') + ('x' if ratio else ''):>8}  {c.note}".rstrip())
    measured = [c for c in cells if c.tiles_per_s]
    if measured:
        best = max(measured, key=lambda c: c.tiles_per_s or 0.0)
        print(f"best: {best.precision} at batch {best.batch_size}: {best.tiles_per_s:.1f} tiles/s "
              f"(FPROTOSEG_PRECISION={best.precision} FPROTOSEG_BATCH_SIZE={best.batch_size})")


def print_end_to_end(rows: list[EndToEnd], slide: Path) -> None:
    print(f"\nend to end: one slide through fprotoseg.worker.wsi.pipeline.run ({slide.name})")
    print(f"{'precision':<10}{'batch':>6}{'seconds':>9}{'tiles':>7}{'tiles/s':>9}  seconds per stage")
    for r in rows:
        rate = r.tiles / r.seconds if r.tiles and r.seconds else None
        timings = r.timings_s or {}
        shown = [k for k in STAGES if k in timings] or [k for k in timings if k != "total"]
        stages = " ".join(f"{k}={timings[k]:.2f}" for k in shown)
        print(f"{r.precision:<10}{r.batch_size:>6}{_fmt(r.seconds, '.2f'):>9}{_fmt(r.tiles, 'd'):>7}"
              f"{_fmt(rate, '.1f'):>9}  {stages or r.note}".rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    """Expected failures (bad checkpoint, unavailable device or precision) end as one line, exit 2."""
    try:
        return _main(argv)
    except Exception as exc:
        from fprotoseg.model.errors import FprotosegError

        if not isinstance(exc, FprotosegError):
            raise
        print(f"bench/gpu.py: error: {exc.message}", file=sys.stderr)
        return 2


def _main(argv: Sequence[str] | None) -> int:
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()) and argv is None:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # table and progress in order
    sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing, too
    import torch

    cuda_ok = torch.cuda.is_available()
    if args.device == "cuda" and not cuda_ok:
        print("bench/gpu.py: error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    device = "cuda" if (args.device == "auto" and cuda_ok) or args.device == "cuda" else "cpu"
    if device == "cpu":
        why = "no CUDA GPU visible" if not cuda_ok else "--device cpu"
        print(f"{why}: measuring the CPU instead (fp32 and bf16; fp16 is GPU-only)")
    plan = make_plan(device, args, bf16_ok=cuda_ok and torch.cuda.is_bf16_supported())

    with tempfile.TemporaryDirectory(prefix="fprotoseg-bench-") as tmp_name:
        tmp = Path(tmp_name)
        checkpoint, what = resolve_checkpoint(args.checkpoint, tmp)
        if device == "cuda":
            props = torch.cuda.get_device_properties(0)
            where = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
        else:
            where = f"CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores visible)"
        print("fprotoseg benchmark")
        print(f"device      {where}; torch {torch.__version__}")
        print(f"checkpoint  {what}")
        start = time.perf_counter()
        cells, segmenters = measure(checkpoint, plan)
        seg = next(iter(segmenters.values()))
        print(f"model       {seg.name}: {seg.tile_size_px} px tiles at {seg.mpp} µm/px, "
              f"{len(seg.classes)} classes")
        print_throughput(cells, plan)

        slide = args.slide if args.slide is not None else (DEFAULT_SLIDE if DEFAULT_SLIDE.exists() else None)
        if args.no_slide or slide is None:
            print("\nend to end: skipped (no slide: pass --slide PATH)")
        else:
            best_batch = {
                p: max((c for c in cells if c.precision == p and c.tiles_per_s),
                       key=lambda c: c.tiles_per_s or 0.0, default=Cell(p, plan.batch_sizes[0])).batch_size
                for p in plan.precisions
            }
            e2e_precisions = plan.precisions[:1] if args.quick else plan.precisions
            rows = [end_to_end(slide, segmenters[p], best_batch[p], tmp / f"e2e-{p}") for p in e2e_precisions]
            print_end_to_end(rows, slide)
        print(f"\nbenchmark took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
