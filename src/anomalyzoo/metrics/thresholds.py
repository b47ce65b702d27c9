"""Candidate decision thresholds and what each would do on the test set.

AUROC says whether scores separate the classes; a deployed inspector needs one threshold. The
candidates cover the usual choices: the F1-optimal point (balanced, but tuned on the test labels),
high percentiles of the normal scores (fix the false-alarm rate, need only normal data), and the
zero-miss point (no defect may pass, whatever the false alarms cost). Every candidate is applied
as ``score >= threshold`` -> anomalous, the same rule as :func:`~anomalyzoo.metrics.roc.f1_max`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from anomalyzoo.metrics.roc import as_binary_inputs, f1_max


@dataclass
class ThresholdRow:
    """Confusion counts and rates of one named threshold.

    ``precision`` is defined as 0.0 when nothing is predicted anomalous (TP + FP = 0): such a
    threshold finds no defect, and 0.0 ranks it below any threshold that finds one.
    """

    name: str
    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    precision: float
    recall: float
    fpr: float
    f1: float


def evaluate_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float, name: str = "custom") -> ThresholdRow:
    """Counts and rates of the prediction ``score >= threshold`` (rates are 0.0 where undefined)."""
    labels, scores = as_binary_inputs(labels, scores)
    predicted = scores >= threshold
    tp = int(np.count_nonzero(predicted & labels))
    fp = int(np.count_nonzero(predicted & ~labels))
    fn = int(np.count_nonzero(~predicted & labels))
    tn = int(np.count_nonzero(~predicted & ~labels))
    return ThresholdRow(
        name=name,
        threshold=float(threshold),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / (tp + fn) if tp + fn else 0.0,
        fpr=fp / (fp + tn) if fp + tn else 0.0,
        f1=2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
    )


def threshold_analysis(labels: np.ndarray, scores: np.ndarray, extra: dict[str, float] | None = None) -> list[ThresholdRow]:
    """Evaluate the four candidate thresholds, in this order, then any ``extra`` ones.

    - ``f1_optimal``: the score that maximises F1 on these labels.
    - ``normal_p95`` / ``normal_p99``: the 95th / 99th percentile of the normal scores (linear
      interpolation), i.e. about 5% / 1% of normals flagged.
    - ``zero_miss``: the lowest anomalous score, the largest threshold that misses no defect.
    - ``extra``: thresholds fixed beforehand, e.g. the label-free ``normal_val_p99`` that a
      trainer chose on held-out normal training images, applied to these labels as they are.

    The first four are chosen *on these labels* (they show what was possible); only the extra
    ones are honest estimates of deployed behaviour. Needs both classes: the percentiles are
    taken over normal scores, the others over anomalous.
    """
    labels, scores = as_binary_inputs(labels, scores)
    normal_scores = scores[~labels]
    anomalous_scores = scores[labels]
    if normal_scores.size == 0 or anomalous_scores.size == 0:
        raise ValueError(
            "threshold analysis needs both normal (0) and anomalous (1) samples, "
            f"got {anomalous_scores.size} anomalous and {normal_scores.size} normal"
        )
    candidates = {
        "f1_optimal": f1_max(labels, scores)[1],
        "normal_p95": float(np.percentile(normal_scores, 95)),
        "normal_p99": float(np.percentile(normal_scores, 99)),
        "zero_miss": float(anomalous_scores.min()),
    }
    candidates.update({name: float(value) for name, value in (extra or {}).items() if name not in candidates})
    return [evaluate_threshold(labels, scores, threshold, name) for name, threshold in candidates.items()]
