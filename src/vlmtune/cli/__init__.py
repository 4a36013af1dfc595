"""The `vlmtune` command: thin, it only parses arguments and calls into the library.

Each area adds its own sub-commands from its module in this package (``data``, ``model``,
``train``, ``evaluate``, ``study``, ``demo``); every command sets ``func`` to the function
that runs it. ``--quiet`` (before or after the command's name) shows warnings and errors only: no
progress bars (:mod:`vlmtune.progress`) and no info messages. ``--version`` prints the versions of the package and of the libraries it trains
with. A command that needs a package of an optional extra that is not installed stops with
``error:`` and the ``pip install`` line that adds it.
"""

from __future__ import annotations

import argparse
import logging
from importlib import metadata
import os
import sys

from vlmtune import NAME, __version__
from vlmtune.errors import VlmtuneError
from vlmtune.logs import setup_logging
from vlmtune.progress import bars_shown


# The import name of each package that only an optional extra installs (pyproject.toml's
# [project.optional-dependencies]; a test checks the two agree).
EXTRA_OF_MODULE = {
    "fastapi": "study", "uvicorn": "study", "multipart": "study", "python_multipart": "study",
    "sacrebleu": "eval", "rouge_score": "eval", "matplotlib": "eval", "httpx": "eval",
}


def build_parser() -> argparse.ArgumentParser:
    from vlmtune.cli import compare, data, demo, evaluate, model, study, tasks, train

    parser = argparse.ArgumentParser(
        prog=NAME,
        description="Preference optimisation (DPO and its fixes) and GRPO for vision-language models.",
    )
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions of this package, torch, transformers and peft, and whether CUDA is seen")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for area in (data, model, train, evaluate, compare, study, demo, tasks):
        area.add_commands(commands)
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP + " (before or after the command)")
    return parser


QUIET_HELP = "no progress bars and no info messages on stderr, only warnings and errors"


def split_quiet(argv: list[str]) -> tuple[bool, list[str]]:
    """``-q`` / ``--quiet`` may stand anywhere on the line: taken out before the commands parse the rest."""
    flag = argparse.ArgumentParser(add_help=False)
    flag.add_argument("-q", "--quiet", action="store_true")
    known, rest = flag.parse_known_args(argv)
    return known.quiet, rest


def main(argv: list[str] | None = None) -> int:
    # Quiet the noisy but harmless warnings of the libraries below before they are imported.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup_logging()
    quiet, argv = split_quiet(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    setup_logging(logging.WARNING if quiet else logging.INFO)
    if quiet:  # wandb (train.report_to) prints its own banner and run summary unless told otherwise
        os.environ.setdefault("WANDB_SILENT", "true")
    if not bars_shown(sys.stderr):  # transformers' own bars ("Loading weights") follow ours; read at its import
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return int(args.func(args) or 0)
    except VlmtuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        extra = EXTRA_OF_MODULE.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"error: this command needs {e.name}, which is not installed; "
              f"install it with: pip install '{NAME}[{extra}]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def version_report() -> str:
    """What ``--version`` prints: this package's version, torch's (with whether CUDA is seen),
    transformers' and peft's; a library that is not installed shows as ``not installed``."""
    lines = [f"{NAME} {__version__}", f"python {sys.version.split()[0]}"]
    try:
        import torch
    except ImportError:
        lines.append("torch not installed")
    else:
        seen = f"yes, {torch.cuda.device_count()} device(s)" if torch.cuda.is_available() else "no"
        lines.append(f"torch {torch.__version__} (built for CUDA {torch.version.cuda or 'none'}; CUDA seen: {seen})")
    for library in ("transformers", "peft"):
        try:
            lines.append(f"{library} {metadata.version(library)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{library} not installed")
    return "\n".join(lines)


class _VersionAction(argparse.Action):
    """``--version``: print ``version_report()`` and exit, like argparse's own version action."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_report())
        parser.exit()


if __name__ == "__main__":
    sys.exit(main())
