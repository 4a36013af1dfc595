"""Stages of a pipeline on disk, reused only when they finished with the same settings.

A stage (``vlmtune demo``'s data, model, training runs, pairs, evaluations) keeps a record, a JSON
file of the settings it ran with and whether it finished. ``run_stage`` runs it again whenever
the settings differ from the record, the stage did not finish (interrupted) or an output is
gone; a stage names the stages it reads by their ``stage_key``, so a change upstream reruns
everything downstream. ``vlmtune demo --quick`` then ``vlmtune demo`` in the same folder
therefore reruns every stage instead of reusing the quick one's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.errors import VlmtuneError


@dataclass(frozen=True)
class Made:
    """A stage's main output and its ``stage_key``."""

    path: Path
    key: str


def run_stage(record: Path, settings: dict[str, Any], outputs: list[Path], build: Callable[[], Any]) -> bool:
    """Run ``build`` unless ``record`` shows the stage finished with exactly ``settings``; True if it ran.

    ``settings`` is everything that decides the stage's outputs, upstream stages included (by
    their ``stage_key``), so a change anywhere reruns every stage after it. Before a rerun the old
    ``outputs`` are deleted, so nothing of the old stage survives. The record says "started"
    before ``build`` and "finished" after it, so an interrupted stage runs again; outputs with no
    record at all were not made by a stage and are never deleted: that is an error.
    """
    wanted = _canonical(settings)
    stored = _stored(record)
    if stored == {"settings": wanted, "finished": True} and all(p.exists() for p in outputs):
        return False
    if not record.exists():
        for path in outputs:
            if path.exists():
                raise VlmtuneError(
                    f"{path} exists, but no stage record ({record}) says it was made here; "
                    "delete it or choose another output folder"
                )
    for path in outputs:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    _write(record, {"settings": wanted, "finished": False})
    build()
    _write(record, {"settings": wanted, "finished": True})
    return True


def stage_key(settings: dict[str, Any]) -> str:
    """A short digest of a stage's settings: how later stages name it among their own settings."""
    return hashlib.sha256(json.dumps(_canonical(settings), sort_keys=True).encode()).hexdigest()[:16]


def _canonical(settings: dict[str, Any]) -> Any:
    """The settings as they read back from JSON (tuples become lists), so the two compare equal."""
    return json.loads(json.dumps(settings, sort_keys=True))


def _stored(record: Path) -> Any:
    """The record's content, or None when it is missing or was cut short."""
    try:
        return json.loads(record.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write(record: Path, content: dict[str, Any]) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
