"""HTML report of an evaluation or prediction run.

:class:`ReportCollector` is fed merged predictions while evaluation streams and keeps memory flat;
its :meth:`~ReportCollector.finish` writes the gallery pictures and ``report_data.json``;
:func:`render_report` turns the data into one self-contained ``report.html``, and
:func:`load_report_data` reads the JSON back so a report can be re-rendered without evaluating.
"""

from anomalib_tiled.report.collector import ReportCollector
from anomalib_tiled.report.data import REPORT_DATA, ReportData
from anomalib_tiled.report.html import REPORT_HTML, load_report_data, render_report

__all__ = ["REPORT_DATA", "REPORT_HTML", "ReportCollector", "ReportData", "load_report_data", "render_report"]
