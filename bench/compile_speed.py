"""Is ``torch.compile`` faster for this network on this host? Eager vs compiled, same batch, one JSON line.

Why a measurement and not a default: inductor's kernels win on some devices and lose on others,
and compiling costs seconds to minutes at start-up. ``load_segmenter(compile_network="auto")``
makes the same comparison at load time and keeps the faster; this prints it for a report.

    python bench/compile_speed.py                      # packaged model, CPU fp32, batch 32
    python bench/compile_speed.py --device cuda --precision fp16 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the packaged model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from fprotoseg.model import load_segmenter

    t0 = time.perf_counter()
    seg = load_segmenter(args.checkpoint, device=args.device, precision=args.precision)
    side = seg.tile_size_px
    sample = np.random.default_rng(0).integers(0, 256, (args.batch_size, side, side, 3), dtype=np.uint8)
    report = seg.compile_if_faster(sample, repeats=args.repeats)
    import torch

    print(json.dumps({
        "model": seg.name,
        "device": seg.device,
        "precision": seg.precision,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "wall_s": time.perf_counter() - t0,
        **report,
    }))


if __name__ == "__main__":
    main()
