"""What a bench that reads a finished run records beside its figures: the run's wall-clock time and what
else ran meanwhile (both measured outside), written to its results file and printed."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser, default_out: Path) -> None:
    parser.add_argument("--wall-seconds", type=float, help="the run's wall-clock time, as measured outside")
    parser.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    parser.add_argument("--out", default=str(default_out), help="default: %(default)s")


def write(result: dict, args: argparse.Namespace) -> int:
    if args.wall_seconds is not None:
        result["wall_seconds"] = args.wall_seconds
    if args.note:
        result["note"] = args.note
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0
