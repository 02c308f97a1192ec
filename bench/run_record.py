"""What a bench records beside its figures. One that reads a finished run: the run's wall-clock time and
what else ran meanwhile (both measured outside), written to its results file and printed. One that times
its own work: `conditions`, the load on the machine when it finished and what the caller says ran."""

from __future__ import annotations

import argparse
import json
import os
import time
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


def conditions(note: str) -> dict:
    """Load average (above the bench's own threads: the cores were shared), time, and the caller's note."""
    return {"load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "note": note}
