"""``fprotoseg train CONFIG``: weak-label training of a FProtoSeg checkpoint from a YAML config.

Writes into --out: history.csv and history.png (per epoch: losses, validation mIoU per class,
images/s), best.safetensors or final.safetensors (weights + manifest; loadable by ``fprotoseg
segment --checkpoint``) and resume.pt (the exact training state ``--resume`` continues from).
Under ``torchrun --nproc_per_node N`` the same command trains on N processes (DDP).
torch is imported only inside the handler.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "train",
        help="train FProtoSeg from image-level labels (stage 1) or on pseudo masks (stage 2)",
        description="Train from a YAML config (see model/configs/). Masks, where a dataset has them, "
        "only ever yield image-level labels of crops; validation uses the held-out pairs.",
    )
    p.add_argument("config", type=Path, help="YAML config (a name under model/configs/ also works)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default runs/<config name>)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue exactly from OUT/resume.pt (an error if there is none or the config differs)",
    )
    p.add_argument(
        "--pretrained",
        type=Path,
        default=None,
        help="state dict (.safetensors or weights-only torch file) for the MiT encoder",
    )
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config entry, e.g. --set loss.alignment=0 (repeatable)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from fprotoseg.model.config_schema import load_config, parse_override
    from fprotoseg.model.training.train import train

    overrides = dict(parse_override(o) for o in args.overrides)
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    if args.pretrained is not None:
        overrides["encoder.pretrained"] = str(args.pretrained.resolve())
    cfg = load_config(args.config, overrides)
    out = args.out or Path("runs") / str(cfg.name)
    result = train(cfg, out, device=args.device, resume=args.resume, progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone reports
        print(json.dumps(result, indent=2))
    return 0
