"""The ``results_..._thresholds.txt`` file: run header, every metric, the threshold table.

Plain text so that it can be read in a terminal, diffed between runs and grepped across a results
tree (``grep image_auroc outputs/*/*/*/results_*``): one ``key: value`` per line, then a
fixed-width table.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from anomalyzoo.metrics.thresholds import ThresholdRow

MISSING_METRIC = "n/a"

_TABLE_COLUMNS = ("name", "threshold", "TP", "FP", "TN", "FN", "precision", "recall", "FPR", "F1")


def _format_metric(name: str, value: object) -> str:
    """Scores to 4 decimals; thresholds to 6 significant digits, as their scale depends on the model."""
    if value is None:
        return MISSING_METRIC
    if isinstance(value, (float, np.floating)):
        return f"{value:.6g}" if "threshold" in name else f"{value:.4f}"
    return str(value)


def _format_header(value: object) -> str:
    # Learning rates and times span orders of magnitude: keep significant digits, not decimals.
    if isinstance(value, (float, np.floating)):
        return f"{value:.6g}"
    return str(value)


def _key_value_block(items: Mapping[str, object], is_metric: bool) -> list[str]:
    width = max((len(key) for key in items), default=0)
    return [
        f"{key:<{width}} : {_format_metric(key, value) if is_metric else _format_header(value)}"
        for key, value in items.items()
    ]


def _threshold_table(rows: list[ThresholdRow]) -> list[str]:
    cells = [
        [
            row.name,
            f"{row.threshold:.6g}",  # score scales differ by orders of magnitude between models
            str(row.tp),
            str(row.fp),
            str(row.tn),
            str(row.fn),
            f"{row.precision:.4f}",
            f"{row.recall:.4f}",
            f"{row.fpr:.4f}",
            f"{row.f1:.4f}",
        ]
        for row in rows
    ]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(_TABLE_COLUMNS)]

    def join(values: list[str] | tuple[str, ...]) -> str:
        # The name column reads left to right; numbers line up on their last digit.
        first = f"{values[0]:<{widths[0]}}"
        rest = [f"{value:>{width}}" for value, width in zip(values[1:], widths[1:])]
        return "  ".join([first, *rest])

    header = join(_TABLE_COLUMNS)
    return [header, "-" * len(header), *(join(line) for line in cells)]


def write_thresholds_report(
    path: str | Path,
    metrics: Mapping[str, object],
    rows: list[ThresholdRow],
    header: Mapping[str, object],
    predict_threshold: str | None = None,
) -> Path:
    """Write the run's header, its metrics (``None`` as ``n/a``) and the threshold table.

    ``header`` is printed in the order given (dataset, category, model, epochs, times, ...);
    the report does not decide what a run must record.
    """
    lines = ["anomalyzoo results", "==================", *_key_value_block(header, is_metric=False), ""]
    lines += ["Metrics", "-------", *_key_value_block(metrics, is_metric=True), ""]
    lines += [
        "Threshold analysis (image level; anomalous when score >= threshold)",
        "-------------------------------------------------------------------",
    ]
    if rows:
        lines += _threshold_table(rows)
        lines.append("precision is 0.0 where a threshold predicts no image anomalous")
        lines.append("f1_optimal, normal_p95/p99 and zero_miss are chosen on the test labels (what was possible);")
        lines.append("normal_val_p* is chosen on held-out normal training images only (what to expect when deployed)")
    else:
        lines.append("(no thresholds)")
    if predict_threshold is not None:
        lines.append(f"predict uses: {predict_threshold} (anomalyzoo predict --threshold normal|f1|VALUE)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
