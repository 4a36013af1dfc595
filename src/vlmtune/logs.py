"""Where the library's messages go: the ``vlmtune`` logger, which the command line shows on stderr.

Library modules log through ``logging.getLogger(__name__)`` and never print to stderr themselves,
so a program that imports vlmtune decides what it sees, and ``accelerate launch`` with several
processes does not print every message once per process: ``setup_logging`` (called by the CLI's
``main``) shows messages as plain lines from the main process and only errors from the others.
"""

from __future__ import annotations

import logging
import os
import sys


class _CurrentStderr(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is when a message is logged, so redirected stderr sees it too."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; the property wins
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Show the ``vlmtune`` logger's messages (``level`` and up) and every other library's warnings on
    stderr, each once; idempotent.

    The command line is the program, so its handler sits on the root logger: a library that
    configures logging when it finds none (absl, under rouge-score, calls ``basicConfig``) then
    adds no second handler that would print each message twice.
    """
    root = logging.getLogger()
    if not any(isinstance(h, _CurrentStderr) for h in root.handlers):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    # The launcher's rank: accelerate / torchrun set RANK for every process they start.
    main_process = os.environ.get("RANK", "0") in ("", "0")
    logging.getLogger("vlmtune").setLevel(level if main_process else logging.ERROR)
