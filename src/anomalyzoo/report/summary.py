"""Summary tables over many runs: one row per (dataset, category, model).

Two files from the same rows: a CSV with full-precision numbers for further analysis, and a
Markdown table (4 decimals) for reading and pasting. A failed run keeps its row, with the message
in an ``error`` column, so a table of 20 models x 15 categories shows which ones are missing and why.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

MISSING_MARKDOWN = "—"


def _default_columns(rows: Sequence[Mapping[str, object]]) -> list[str]:
    """Every key in order of first appearance, with ``error`` moved to the end."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    if "error" in columns:
        columns.remove("error")
        columns.append("error")
    return columns


def _resolve_columns(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None) -> list[str]:
    columns = list(columns) if columns is not None else _default_columns(rows)
    if not columns:
        raise ValueError("a summary table needs at least one column (pass columns= or non-empty rows)")
    return columns


def _markdown_cell(value: object) -> str:
    if value is None:
        return MISSING_MARKDOWN
    if isinstance(value, (float, np.floating)) and not isinstance(value, bool):
        return f"{value:.4f}"
    # A pipe would split the cell and a newline the row; error messages contain both.
    return " ".join(str(value).split()).replace("|", "\\|")


def format_markdown_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str] | None = None) -> str:
    """A padded Markdown table of ``rows`` (missing or ``None`` cells as "—", floats to 4 decimals)."""
    columns = _resolve_columns(rows, columns)
    cells = [[_markdown_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(3, len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]

    def join(values: Sequence[str]) -> str:
        return "| " + " | ".join(f"{value:<{width}}" for value, width in zip(values, widths)) + " |"

    lines = [join(columns), join(["-" * width for width in widths]), *(join(line) for line in cells)]
    return "\n".join(lines)


def _csv_cell(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_summary_tables(
    rows: Sequence[Mapping[str, object]],
    csv_path: str | Path,
    md_path: str | Path,
    columns: Sequence[str] | None = None,
) -> tuple[Path, Path]:
    """Write ``rows`` to a CSV file and a Markdown file; returns both paths.

    Without ``columns`` every key of every row is a column (``error`` last), so a failed run's row
    brings the ``error`` column even when the other rows lack it. ``None`` is an empty CSV cell.
    """
    columns = _resolve_columns(rows, columns)
    csv_path, md_path = Path(csv_path), Path(md_path)
    for path in (csv_path, md_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_cell(row.get(column)) for column in columns])
    md_path.write_text(format_markdown_table(rows, columns) + "\n", encoding="utf-8")
    return csv_path, md_path
