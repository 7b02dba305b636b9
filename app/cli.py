"""The ``fprotoseg`` command line: one entry point, one module per subcommand in ``fprotoseg.app.commands``.

Subcommand modules import heavy dependencies (torch, OpenSlide) only inside their handlers, so
``fprotoseg --help`` and the API process stay light. Expected failures (FprotosegError) end as a
one-line message on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name of module in fprotoseg.app.commands -> each defines `register(subparsers) -> None`
COMMAND_MODULES = ("segment", "info", "serve", "worker", "train", "evaluate", "pseudo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fprotoseg",
        description="Whole-slide H&E tissue segmentation (FProtoSeg) -> QuPath GeoJSON and µm² statistics.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        # a module missing from the install is a packaging error: let its import error surface
        importlib.import_module(f"fprotoseg.app.commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from fprotoseg.model.errors import FprotosegError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except FprotosegError as exc:
        print(f"fprotoseg: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fprotoseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
