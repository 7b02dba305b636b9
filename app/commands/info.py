"""``fprotoseg info SLIDE``: the slide's metadata as JSON (reader, vendor, size, levels, µm/px).

Uses the same vetting and MPP resolution as ``segment``, so what it prints is what a run would use.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("info", help="print a slide's metadata (levels, µm/px, reader) as JSON")
    p.add_argument("slide", type=Path)
    p.add_argument("--mpp", type=float, default=None, help="level-0 µm/px, overriding the slide metadata")
    p.add_argument("--properties", action="store_true", help="also print the reader's raw property list")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from fprotoseg.worker.wsi.slide import open_slide

    # info is where users find out a slide lacks its pixel size: print mpp null and the fix.
    slide = open_slide(args.slide, mpp_override=args.mpp, require_mpp=False)
    with slide:
        info = slide.metadata()
        info["file_size_bytes"] = args.slide.stat().st_size
        if args.properties:
            info["properties"] = dict(sorted(slide.properties.items()))
    print(json.dumps(info, indent=2, ensure_ascii=False))
    return 0
