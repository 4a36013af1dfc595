"""The `vlmrl` command: thin, it only parses arguments and calls into the library.

Each area adds its own sub-commands from its module in this package (``data``, ``model``,
``train``, ``evaluate``, ``study``, ``demo``); every command sets ``func`` to the function
that runs it.
"""

from __future__ import annotations

import argparse
import os
import sys

from vlmrl import __version__
from vlmrl.errors import VlmrlError
from vlmrl.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    from vlmrl.cli import compare, data, demo, evaluate, model, study, tasks, train

    parser = argparse.ArgumentParser(
        prog="vlmrl",
        description="Preference optimisation (DPO and its fixes) and GRPO for vision-language models.",
    )
    parser.add_argument("--version", action="version", version=f"vlmrl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for area in (data, model, train, evaluate, compare, study, demo, tasks):
        area.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Quiet the noisy but harmless warnings of the libraries below before they are imported.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VlmrlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
