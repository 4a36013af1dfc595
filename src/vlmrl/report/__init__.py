"""The before/after report: ``write_report(out_dir, [RunResult(...), ...]) -> report.html``."""

from vlmrl.report.html import write_report
from vlmrl.report.inputs import RunResult

__all__ = ["RunResult", "write_report"]
