"""What a run leaves for a person to read: histogram, anomaly-map figures, text report, summaries."""

from __future__ import annotations

from anomalyzoo.report.figures import save_anomaly_map_figure, save_histogram
from anomalyzoo.report.summary import format_markdown_table, write_summary_tables
from anomalyzoo.report.text import write_thresholds_report

__all__ = [
    "format_markdown_table",
    "save_anomaly_map_figure",
    "save_histogram",
    "write_summary_tables",
    "write_thresholds_report",
]
