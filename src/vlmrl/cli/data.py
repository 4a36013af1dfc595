"""`vlmrl data ...`: read, check, convert and build preference data."""

from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction) -> None:
    from vlmrl.cli import data_build

    data = commands.add_parser("data", help="read, check, convert and build preference data")
    sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    data_build.add_commands(sub)
