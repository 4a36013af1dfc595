"""The before/after report: ``write_report(out_dir, [RunResult(...), ...]) -> report.html``."""

from vlmrl.report.html import write_report
from vlmrl.report.results import RunResult

__all__ = ["RunResult", "write_report"]
