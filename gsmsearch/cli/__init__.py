"""The `gsmsearch` command line: one module per command, assembled here.

Heavy libraries (torch, Ray, Dash) are imported inside the commands, so `gsmsearch --help`
answers at once.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ._errors import run_guarded

__all__ = ["main", "build_parser"]

COMMANDS = ("_launch", "_studies", "_train", "_dashboard")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="gsmsearch",
        description="Structure search for efficient neural networks (GBLR matrices, Pareto fronts).",
        epilog="Set GSMSEARCH_DEBUG=1 for tracebacks.",
    )
    parser.add_argument("--version", action="version", version=f"gsmsearch {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return run_guarded(args.run, args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
