"""Progress bars for the long loops a user waits on (answering, judging, data building, precompute).

``progress_bar(iterable=None, *, total=None, desc, unit="record")`` returns a ``tqdm`` bar that
shows the count, records/s and the time left (when the total is known) on stderr. Use it as an
iterator wrapper (``for x in progress_bar(items, desc="judge")``) or as a context manager that
the loop advances (``with progress_bar(total=n, desc="answer") as bar: ... bar.update(k)``).

When it shows: only when stderr is a terminal and the ``vlmtune`` logger shows info messages.
The command line's ``--quiet`` raises that logger to warnings (:func:`vlmtune.logs.setup_logging`),
and other processes than the main one of a multi-process launch log errors only, so both get no
bar; a program that imports vlmtune silences bars the same way it silences vlmtune's messages.
``file`` (tests) writes to another stream; ``enabled`` forces the bar on or off.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Sized
from typing import IO

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed} elapsed, {remaining} left, {rate_fmt}]"
# Without a total there is no percentage or time left: the count and the rate.
COUNT_FORMAT = "{desc}: {n_fmt} {unit} [{elapsed} elapsed, {rate_fmt}]"
FALLBACK_SIZE = (100, 24)  # columns, rows


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str = "record",
                 file: IO[str] | None = None, enabled: bool | None = None):
    """A ``tqdm`` bar over ``iterable`` (or advanced by hand) with records/s and time left.

    ``total`` defaults to ``len(iterable)`` where it has one. ``enabled=None`` decides by
    :func:`bars_shown` on ``file`` (default: ``sys.stderr`` as it is now).
    """
    from tqdm import tqdm

    stream = sys.stderr if file is None else file
    if total is None and isinstance(iterable, Sized):
        total = len(iterable)
    show = bars_shown(stream) if enabled is None else enabled
    # A terminal that reports no size (a bare pty: `script`, some CI and container runners) would get
    # no bar at all from tqdm's own measure (0 columns, -1 rows): such a one gets a fixed size instead.
    sized = _columns(stream) > 0
    fixed = {} if sized else {"ncols": FALLBACK_SIZE[0], "nrows": FALLBACK_SIZE[1]}
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, disable=not show, dynamic_ncols=sized,
                bar_format=BAR_FORMAT if total is not None else COUNT_FORMAT, leave=True, **fixed)


def bars_shown(stream: IO[str]) -> bool:
    """True when ``stream`` is a terminal and the ``vlmtune`` logger shows info messages (not ``--quiet``)."""
    return stream.isatty() and logging.getLogger("vlmtune").isEnabledFor(logging.INFO)


def _columns(stream: IO[str]) -> int:
    """The terminal's width in columns; 0 when ``stream`` is no terminal or the terminal says none."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError):  # io.UnsupportedOperation (no file number) is both
        return 0
