"""Read a data file for training or evaluation: the records that pass every check in ``data.check``.

Bad records stop the run with a message that lists them, unless ``skip_bad``: then the good records
are returned and what was skipped, and why, is logged as a warning. Warnings of the check (images
above its pixel limit) are logged and the records kept.

For KTO (``kto=True``) records with one answer are accepted and every pair is split into its two
unpaired records (``records.unpair``), as TRL's KTO trainer unpairs a paired data set.
"""

from __future__ import annotations

import logging
from pathlib import Path

from vlmtune.data.check import DEFAULT_MAX_CHARS, problem_lines, scan
from vlmtune.data.records import PreferenceRecord, unpair
from vlmtune.errors import VlmtuneError

log = logging.getLogger(__name__)


def load_records(path: str | Path, fmt: str | None = None, skip_bad: bool = False,
                 max_chars: int = DEFAULT_MAX_CHARS, check_images: bool = True,
                 workers: int = 2, kto: bool = False) -> list[PreferenceRecord]:
    """The records of ``path`` that pass every check. Raises VlmtuneError naming the problems unless
    ``skip_bad``; then it logs what it skipped and why. ``kto``: unpaired records, pairs unpaired."""
    records = _checked_records(path, fmt, skip_bad, max_chars, check_images, workers, kto)
    if not kto:
        return records
    n_pairs = sum(not r.is_unpaired for r in records)
    if n_pairs:
        log.info("%s: split %d pair(s) into %d unpaired records for KTO", path, n_pairs, 2 * n_pairs)
    return [one for record in records for one in unpair(record)]


def _checked_records(path, fmt, skip_bad, max_chars, check_images, workers, kto) -> list[PreferenceRecord]:
    report, records, whole_file = scan(path, fmt, max_chars, check_images, workers, keep=True, kto=kto)
    check = f"vlmtune data check {'--for kto ' if kto else ''}{path}"
    if report.warnings:
        log.warning("%s: %d warning(s):\n%s", path, len(report.warnings), problem_lines(report.warnings))
    if report.ok:
        return records
    if whole_file:
        raise VlmtuneError(f"{path} cannot be read as data:\n{problem_lines(report.problems)}\n"
                         f"Fix it (`{check}` lists every problem).")
    if not skip_bad:
        raise VlmtuneError(f"{path}: {len(report.problems)} problem(s) in {report.bad_records} of "
                         f"{report.records_read} records:\n{problem_lines(report.problems)}\n"
                         f"Fix them (`{check}` lists them all) or pass --skip-bad.")
    log.warning("%s: skipped %d of %d records:\n%s", path, report.bad_records, report.records_read,
                problem_lines(report.problems))
    return records
