"""CLI commands for delta (thin: argument parsing only, the work is in the library)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this module's subcommands on sub; each sets func to a callable(args) -> int."""
