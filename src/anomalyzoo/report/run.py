"""The files of one training run (spec sec. 5): the results text, the score histogram and the
anomaly-map figures, from a run's :class:`~anomalyzoo.metrics.predictions.Predictions`; and the
data the HTML report (:mod:`anomalyzoo.report.html`) draws from: every image's score
(``scores_<name>.csv``), the threshold table (``thresholds_<name>.csv``) and the hardest test images
with their maps (``hardest_<name>.npz``: the highest-scored normals and the lowest-scored defects)."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from anomalyzoo.metrics.predictions import Predictions
from anomalyzoo.metrics.thresholds import ThresholdRow, threshold_analysis
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


HARDEST_PER_CLASS = 3  # highest-scored normals and lowest-scored defects kept for the report
HARDEST_MAX_SIDE = 512  # larger examples are subsampled: the report shows them a few hundred pixels wide
SCORE_COLUMNS = ("index", "path", "defect_type", "label", "score", "verdict")


def write_scores_csv(path: str | Path, predictions: Predictions, threshold: float | None) -> Path:
    """One row per test image: its path, defect type, label (0 normal, 1 anomalous), score (full
    precision) and the verdict at ``threshold`` (``score >= threshold``; empty without one)."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(SCORE_COLUMNS)
        for index, (score, label) in enumerate(zip(predictions.scores.tolist(), predictions.labels.tolist())):
            verdict = "" if threshold is None else ("anomalous" if score >= threshold else "normal")
            writer.writerow([index, _at(predictions.paths, index), _at(predictions.defect_types, index), int(label),
                             repr(float(score)), verdict])
    return path


def write_thresholds_csv(path: str | Path, predictions: Predictions, stored_thresholds: dict[str, float]) -> Path:
    """The threshold table of the results file (same rows, same order), as CSV."""
    rows = threshold_analysis(predictions.labels, predictions.scores, extra=stored_thresholds)
    fields = [field.name for field in dataclasses.fields(ThresholdRow)]
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        for row in rows:
            writer.writerow([repr(value) if isinstance(value, float) else value
                             for value in (getattr(row, name) for name in fields)])
    return path


def read_thresholds_csv(path: str | Path) -> list[ThresholdRow]:
    with Path(path).open(newline="", encoding="utf-8") as handle:
        return [ThresholdRow(name=row["name"], threshold=float(row["threshold"]), tp=int(row["tp"]), fp=int(row["fp"]),
                             tn=int(row["tn"]), fn=int(row["fn"]), precision=float(row["precision"]),
                             recall=float(row["recall"]), fpr=float(row["fpr"]), f1=float(row["f1"]))
                for row in csv.DictReader(handle)]


def hardest_indices(predictions: Predictions, count: int = HARDEST_PER_CLASS) -> tuple[list[int], list[int]]:
    """The ``count`` normal images with the highest scores (the false alarms to expect first) and
    the ``count`` anomalous ones with the lowest (the defects best hidden from the model). Ties keep
    dataset order (a stable sort), so the choice is deterministic."""
    scores = np.asarray(predictions.scores, dtype=np.float64)
    normal = np.flatnonzero(predictions.labels == 0)
    anomalous = np.flatnonzero(predictions.labels == 1)
    worst_normal = normal[np.argsort(-scores[normal], kind="stable")][:count]
    hidden_anomalous = anomalous[np.argsort(scores[anomalous], kind="stable")][:count]
    return worst_normal.tolist(), hidden_anomalous.tolist()


def save_hardest_examples(path: str | Path, predictions: Predictions, images: dict[int, np.ndarray],
                          worst_normal: list[int], hidden_anomalous: list[int], threshold: float | None,
                          map_range: tuple[float, float] | None) -> Path:
    """``hardest_<name>.npz``: the chosen images (uint8), their maps (float32, absent for image-level
    models), masks, scores and paths, and the run's threshold and map colour range, so the report
    draws them exactly as the run's own figures are drawn."""
    indices = list(worst_normal) + list(hidden_anomalous)
    step = max(1, math.ceil(max((images[i].shape[0] for i in indices), default=1) / HARDEST_MAX_SIDE))
    arrays: dict[str, np.ndarray] = {
        "index": np.asarray(indices, dtype=np.int64),
        "label": np.asarray([int(predictions.labels[i]) for i in indices], dtype=np.int64),
        "score": np.asarray([float(predictions.scores[i]) for i in indices], dtype=np.float64),
        "path": np.asarray([_at(predictions.paths, i) for i in indices], dtype=str),
        "image": np.stack([images[i][::step, ::step] for i in indices]) if indices else np.zeros((0, 1, 1, 3), np.uint8),
        "threshold": np.asarray(np.nan if threshold is None else threshold, dtype=np.float64),
        "map_range": np.asarray(map_range if map_range is not None else (np.nan, np.nan), dtype=np.float64),
    }
    if predictions.anomaly_maps is not None and indices:
        arrays["anomaly_map"] = np.stack([predictions.anomaly_maps[i][::step, ::step] for i in indices]).astype(np.float32)
    if predictions.masks is not None and indices:
        arrays["mask"] = np.stack([predictions.masks[i][::step, ::step] for i in indices]).astype(bool)
    path = Path(path)
    np.savez_compressed(path, **arrays)
    return path


def _at(values: list[str], index: int) -> str:
    return values[index] if index < len(values) else ""
