"""CLI command report (thin: argument parsing only, the work is in rankwise.report)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``report``; it sets func to a callable(args) -> int."""
    p = sub.add_parser(
        "report",
        help="one self-contained HTML page with plots of a compressed model, sweep or delta",
        description="Write an HTML report (figures embedded, nothing loaded from the network) of DIR, "
        "written by rankwise compress, sweep or delta extract, and each figure as a PNG beside it "
        "(OUT-<figure>.png). Needs matplotlib (the report extra).",
    )
    p.add_argument("dir", metavar="DIR", help="output directory of rankwise compress, sweep or delta extract")
    p.add_argument("--out", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--force", action="store_true", help="replace an existing --out and its figure files")
    p.set_defaults(func=run_report)


def run_report(args) -> int:
    from ..report import write_report

    paths = write_report(args.dir, args.out, force=args.force)
    print(f"wrote {paths[0]} and {len(paths) - 1} figures beside it ({', '.join(Path(p).name for p in paths[1:])})")
    return 0
