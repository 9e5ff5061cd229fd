"""The ``rankwise`` command: parses arguments, calls the library, turns bad input into one line and exit 2."""

from __future__ import annotations

import argparse
import signal
import sys

from . import compress as _compress_cmds
from . import delta as _delta_cmds
from . import merge as _merge_cmds
from . import report as _report_cmds
from . import sweep as _sweep_cmds

USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankwise", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (_compress_cmds, _sweep_cmds, _report_cmds, _delta_cmds, _merge_cmds):
        module.add_commands(sub)
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # a kill (SIGTERM) cleans up like Ctrl-C: no partial output is left


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return int(args.func(args) or 0)
    except USAGE_ERRORS as exc:
        print(f"rankwise {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rankwise {args.command}: interrupted; no output was written", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
