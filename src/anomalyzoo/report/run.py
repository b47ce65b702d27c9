"""The files of one training run (spec sec. 5): the results text, the score histogram and the
anomaly-map figures, from a run's :class:`~anomalyzoo.metrics.predictions.Predictions`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from anomalyzoo.metrics.predictions import Predictions
from anomalyzoo.metrics.thresholds import threshold_analysis
from anomalyzoo.report.figures import save_anomaly_map_figure, save_histogram
from anomalyzoo.report.text import write_thresholds_report


def write_run_results(path: str | Path, metrics: dict[str, Any], predictions: Predictions, stored_thresholds: dict[str, float],
                      header: dict[str, Any], predict_threshold_name: str | None, predict_threshold: float | None) -> Path:
    """Header, metrics, every threshold candidate (the test-label ones and the stored label-free
    ones) and which threshold ``predict`` applies."""
    rows = threshold_analysis(predictions.labels, predictions.scores, extra=stored_thresholds)
    used = f"{predict_threshold_name} = {predict_threshold:.6g}" if predict_threshold is not None else "none"
    return write_thresholds_report(path, metrics, rows, header, predict_threshold=used)


def save_run_histogram(path: str | Path, predictions: Predictions, stored_thresholds: dict[str, float], title: str = "") -> Path:
    rows = threshold_analysis(predictions.labels, predictions.scores, extra=stored_thresholds)
    thresholds = {row.name: row.threshold for row in rows}
    return save_histogram(path, predictions.scores, predictions.labels, thresholds, title=title)


def save_run_maps(output_dir: str | Path, prefix: str, predictions: Predictions, images: list[np.ndarray | None],
                  threshold: float | None, map_range: tuple[float, float] | None, max_per_class: int = 5) -> list[Path]:
    """``{prefix}_normal_0001.png``, ``{prefix}_anomaly_0001.png``, ... for the first images of each
    class. ``images`` are the matching uint8 (H, W, 3) inputs; every figure shares ``map_range``."""
    if predictions.anomaly_maps is None:
        return []
    output_dir = Path(output_dir)
    vmin, vmax = map_range if map_range is not None else (None, None)
    written: list[Path] = []
    for label, name in ((0, "normal"), (1, "anomaly")):
        indices = np.flatnonzero(predictions.labels == label)[:max_per_class]
        for number, index in enumerate(indices, start=1):
            mask = predictions.masks[index] if predictions.masks is not None and label == 1 else None
            written.append(save_anomaly_map_figure(
                output_dir / f"{prefix}_{name}_{number:04d}.png", images[index], predictions.anomaly_maps[index],
                mask, float(predictions.scores[index]), threshold=threshold, vmin=vmin, vmax=vmax,
                title=Path(predictions.paths[index]).name,
            ))
    return written
