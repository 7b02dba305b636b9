"""``fprotoseg evaluate``: score a checkpoint on image+mask pairs; prints ONE JSON object.

Keys: miou, miou_present (mean over the classes the masks hold), iou (per class), fwiou, dice (per
class), mdice, pixel_accuracy, confusion_matrix, protocol (the protocol's name in
``fprotoseg.model.training.metrics``), protocol_source (the papers that define it), iou_background (under
``background_included``), context, images, checkpoint, checkpoint_sha256, dataset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DATASET_NAMES = ("wsss4luad", "luad-histoseg", "bcss-wsss")
# the metric's aliases (old names and papers), spelled out here so --help needs no numpy import
PROTOCOL_ALIASES = (
    "ignore_background",
    "tissue_mean_with_background",
    "wsss4luad_challenge",
    "mlps",
    "tpro",
    "pbip",
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("evaluate", help="mIoU/FwIoU/Dice of a checkpoint on image+mask pairs (JSON)")
    p.add_argument("--dataset", choices=DATASET_NAMES, default="wsss4luad")
    p.add_argument(
        "--data-root", type=Path, required=True, help="folder with img/ and mask/ (or test|val/ inside)"
    )
    p.add_argument("--checkpoint", type=Path, default=None, help="default: the packaged model")
    p.add_argument(
        "--names",
        default=None,
        help="comma-separated image names to score (e.g. the held-out split); "
        "'heldout' = the split stored in the checkpoint's config",
    )
    p.add_argument(
        "--protocol",
        default="background_excluded",
        choices=["background_excluded", "background_included", "paper", *PROTOCOL_ALIASES],
        help="what ground-truth background (LUAD-HistoSeg/BCSS-WSSS mask 4) counts for: "
        "background_excluded (WSSS4LUAD challenge, MLPS; the default, as before), "
        "background_included (TPRO, PBIP: tissue predicted on background costs precision), "
        "paper (the dataset's published protocol: included for LUAD-HistoSeg and BCSS-WSSS)",
    )
    p.add_argument(
        "--context",
        default="reflect",
        choices=["reflect", "glass"],
        help="what fills a tile beyond each crop: mirrored crop (the literature's crop protocol) "
        "or empty glass, as a biopsy edge shows it to the whole-slide worker",
    )
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from fprotoseg.model.training.evaluate import evaluate_checkpoint, heldout_names

    names = None
    if args.names == "heldout":
        names = heldout_names(args.checkpoint)
    elif args.names:
        names = [n.strip() for n in args.names.split(",") if n.strip()]
    result = evaluate_checkpoint(
        args.checkpoint,
        args.data_root,
        args.dataset,
        names,
        args.protocol,
        args.device,
        args.precision,
        args.context,
    )
    print(json.dumps(result))
    return 0
