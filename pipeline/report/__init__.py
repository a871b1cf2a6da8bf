"""The evaluation report: plots of the stages' metrics, report.md and a self-contained report.html."""

from pipeline.report.build import REPORT_HTML, REPORT_MD, ReportError, build

__all__ = ["REPORT_HTML", "REPORT_MD", "ReportError", "build"]
