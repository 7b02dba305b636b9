"""``fprotoseg pseudo CONFIG --checkpoint STAGE1 --out DIR``: export and score pseudo masks.

Writes DIR/train/*.png and DIR/val/*.png (palette PNGs: tissue classes 0..K-1 in the dataset's
colours, K = background with ``stage2.background``, 255 = ignore) and DIR/pseudo_miou.json;
prints one line per split with the pseudo-mask mIoU where the images have masks. The config
supplies the data and the pseudo-mask settings (its ``stage2`` section where it has one).
torch is imported only inside the handler.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pseudo",
        help="export a stage-1 checkpoint's pseudo masks (palette PNGs) and their mIoU where masks exist",
        description="Pseudo masks as stage 2 would train on them (label-gated CAMs, flip and rotation "
        "TTA), for the config's training images and validation pairs; scored against masks where "
        "they exist.",
    )
    p.add_argument("config", type=Path, help="YAML config (a name under model/configs/ also works)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="stage-1 checkpoint (default: the config's stage2.teacher)",
    )
    p.add_argument("--out", type=Path, required=True, help="folder for train/, val/ and pseudo_miou.json")
    p.add_argument(
        "--tta",
        default="flip_rot",
        choices=["none", "flip", "flip_rot"],
        help="test-time augmentation of the CAMs: flip_rot = all 8 flips and 90-degree rotations",
    )
    p.add_argument(
        "--splits",
        default="train,val",
        help="train (the config's training images), val (its validation pairs) or both",
    )
    p.add_argument(
        "--protocol",
        default="paper",
        help="metric protocol (fprotoseg.model.training.metrics; default: the dataset's published one)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, e.g. --set stage2.background=true (repeatable)",
    )
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from fprotoseg.model.config_schema import (
        REPO_ROOT,
        check_paths,
        load_config,
        parse_override,
        resolve_path,
    )
    from fprotoseg.model.errors import ConfigurationError
    from fprotoseg.model.segmenter import resolve_device
    from fprotoseg.model.training.metrics import resolve_protocol
    from fprotoseg.model.training.pseudo_export import export_pseudo_masks

    overrides = dict(parse_override(o) for o in args.overrides)
    cfg = load_config(args.config, overrides, check_paths=False)
    check_paths(cfg, REPO_ROOT, Path(args.config).name, teacher=args.checkpoint is None)
    if args.checkpoint is not None:
        checkpoint = args.checkpoint
    elif cfg.stage2.teacher:
        checkpoint = resolve_path(cfg.stage2.teacher)
    else:
        raise ConfigurationError("pass --checkpoint STAGE1 (the config names no stage2.teacher)")
    if not checkpoint.is_file():
        raise ConfigurationError(f"checkpoint not found: {checkpoint}")
    try:
        resolve_protocol(args.protocol, cfg.data.dataset)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    if not splits or set(splits) - {"train", "val"}:
        raise ConfigurationError(f"--splits takes train, val or train,val, got {args.splits!r}")
    result = export_pseudo_masks(
        cfg,
        checkpoint,
        args.out,
        device=resolve_device(args.device),
        tta=args.tta,
        protocol=args.protocol,
        splits=splits,
    )
    print(json.dumps({s: {k: v for k, v in e.items() if k != "iou"} for s, e in result["splits"].items()}))
    return 0
