"""Read a JSON Lines file whose every line is one object, with errors that name the file and line.

Used for evaluation samples and training logs (``report/inputs.py``, ``demo.py``), LLaVA-Bench
questions, answers and captions (``eval/suites.py``) and ``vlmtune infer`` answers
(``eval/answers.py``). Blank lines are ignored.
``stop_or_skip`` is the ``--skip-bad`` rule it applies to a bad line, for callers' other checks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vlmtune.errors import VlmtuneError

log = logging.getLogger(__name__)


def read_jsonl(path: str | Path, required: tuple[str, ...] = (),
               skip_bad: bool | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for every non-blank line of ``path``, in order.

    A line is bad when it is not valid JSON, not a JSON object, or lacks a key of ``required``.
    ``skip_bad`` says what happens then: ``None`` (the caller offers no skipping) stops with a
    ``VlmtuneError`` naming the file and line; ``False`` stops too, and the message adds that
    ``--skip-bad`` would skip the line; ``True`` logs a warning naming the line and goes on.
    """
    path = Path(path)
    if not path.is_file():
        raise VlmtuneError(f"{path} does not exist (or is not a file)")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                row, problem = _parse(line, required)
                if problem is None:
                    rows.append((line_no, row))
                else:
                    stop_or_skip(f"{path}, line {line_no}: {problem}", skip_bad)
    except UnicodeDecodeError as e:
        raise VlmtuneError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    return rows


def _parse(line: str, required: tuple[str, ...]) -> tuple[Any, str | None]:
    """The line's object and ``None``, or ``None`` and what is wrong with the line."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e})"
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    missing = [k for k in required if k not in row]
    if missing:
        return None, f"missing {', '.join(missing)}"
    return row, None


def stop_or_skip(message: str, skip_bad: bool | None) -> None:
    """Raise ``VlmtuneError(message)`` or, with ``skip_bad``, log it as skipped (see ``read_jsonl``)."""
    if skip_bad is None:
        raise VlmtuneError(message)
    if not skip_bad:
        raise VlmtuneError(f"{message} (or pass --skip-bad to skip it)")
    log.warning("skipped %s", message)
