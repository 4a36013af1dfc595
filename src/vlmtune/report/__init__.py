"""The before/after report: ``write_report(out_dir, [RunResult(...), ...]) -> report.html``."""

from vlmtune.report.html import write_report
from vlmtune.report.inputs import RunResult

__all__ = ["RunResult", "write_report"]
