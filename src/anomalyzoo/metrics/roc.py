"""Threshold-free binary metrics: AUROC, average precision and the best F1.

All three read the same object: the counts of true and false positives obtained when the
prediction is ``score >= t`` for every distinct score ``t``, from the highest down. That curve
costs one sort (O(n log n)), so the same code serves a hundred image scores and ten million pixel
scores. Tied scores are one threshold: they enter the prediction together, which is what makes
AUROC equal to the Mann-Whitney statistic with average ranks (a tied pair counts one half).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RankedCurve:
    """Confusion counts at every distinct score, highest threshold first.

    ``true_positives[i]`` and ``false_positives[i]`` are the counts for the prediction
    ``score >= thresholds[i]``; the last entry predicts everything positive.
    """

    thresholds: np.ndarray
    true_positives: np.ndarray
    false_positives: np.ndarray
    num_positive: int
    num_negative: int


def as_binary_inputs(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten and check ``labels`` (0/1 or bool) and ``scores`` (real, no NaN).

    Returns a bool label vector and a float score vector of the same length. Scores keep a
    floating dtype they already have (float32 maps stay float32, halving the cost of the sort);
    integer scores become float64. NaN is refused because it has no place in an ordering and
    would silently land at one end of the curve.
    """
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores).ravel()
    if labels.shape != scores.shape:
        raise ValueError(
            f"labels and scores must have the same number of elements, got {labels.size} and {scores.size}"
        )
    if labels.size == 0:
        raise ValueError("labels and scores are empty")
    if labels.dtype != bool:
        if not np.all((labels == 0) | (labels == 1)):
            raise ValueError("labels must be binary (0 = normal, 1 = anomalous)")
        labels = labels == 1
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return labels, scores


def ranked_curve(labels: np.ndarray, scores: np.ndarray) -> RankedCurve:
    """Sort once and count true/false positives at each distinct score (descending)."""
    labels, scores = as_binary_inputs(labels, scores)
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    cumulative_positives = np.cumsum(labels[order], dtype=np.int64)
    # The last position of each run of equal scores closes one threshold: everything tied with it
    # is already counted there.
    group_ends = np.append(np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), sorted_scores.size - 1)
    true_positives = cumulative_positives[group_ends]
    false_positives = group_ends + 1 - true_positives
    num_positive = int(cumulative_positives[-1])
    return RankedCurve(
        thresholds=sorted_scores[group_ends],
        true_positives=true_positives,
        false_positives=false_positives,
        num_positive=num_positive,
        num_negative=int(labels.size - num_positive),
    )


def auroc_from_curve(curve: RankedCurve) -> float:
    """Area under the ROC curve by the trapezoid rule over distinct thresholds.

    A trapezoid across a tie group is exactly the half credit that the Mann-Whitney statistic
    gives a tied (normal, anomalous) pair, so this equals ``U / (P * N)`` with average ranks.
    """
    if curve.num_positive == 0 or curve.num_negative == 0:
        raise ValueError(
            "AUROC needs both normal (0) and anomalous (1) samples, "
            f"got {curve.num_positive} anomalous and {curve.num_negative} normal"
        )
    tps = np.concatenate(([0.0], curve.true_positives.astype(np.float64)))
    fps = np.concatenate(([0.0], curve.false_positives.astype(np.float64)))
    area = np.sum(np.diff(fps) * (tps[1:] + tps[:-1])) / 2.0
    return float(area / (float(curve.num_positive) * float(curve.num_negative)))


def average_precision_from_curve(curve: RankedCurve) -> float:
    """Step-wise average precision: ``sum_k (R_k - R_{k-1}) * P_k`` over distinct thresholds.

    This is scikit-learn's definition (no interpolation): each gain in recall is weighted by the
    precision reached at that threshold, so it is not optimistic the way the trapezoid is.
    """
    if curve.num_positive == 0:
        raise ValueError("average precision needs at least one anomalous (1) sample")
    tps = curve.true_positives.astype(np.float64)
    precision = tps / (tps + curve.false_positives)
    recall_gain = np.diff(np.concatenate(([0.0], tps))) / curve.num_positive
    return float(np.sum(recall_gain * precision))


def f1_max_from_curve(curve: RankedCurve) -> tuple[float, float]:
    """Best F1 over all thresholds and the (highest) threshold that reaches it."""
    if curve.num_positive == 0:
        raise ValueError("F1 needs at least one anomalous (1) sample")
    tps = curve.true_positives.astype(np.float64)
    # F1 = 2TP / (2TP + FP + FN) and TP + FN = P, so the denominator is TP + FP + P.
    f1 = 2.0 * tps / (tps + curve.false_positives + curve.num_positive)
    best = int(np.argmax(f1))
    return float(f1[best]), float(curve.thresholds[best])


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the probability that an anomalous sample outscores a normal one.

    Ties count one half (Mann-Whitney U with average ranks). Raises ``ValueError`` when only one
    class is present, because the question has no answer then.
    """
    return auroc_from_curve(ranked_curve(labels, scores))


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Average precision (area under the step-wise precision-recall curve, as scikit-learn).

    More telling than AUROC when anomalies are rare (defect pixels are often < 2% of a test
    set), because false positives among many normals pull precision down while barely moving FPR.
    """
    return average_precision_from_curve(ranked_curve(labels, scores))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """``(best F1, threshold)`` over every distinct score, predicting anomalous when ``score >= threshold``.

    The threshold is a score that occurs in ``scores``; when several reach the same F1 the highest
    one is returned (the most conservative operating point with that F1).
    """
    return f1_max_from_curve(ranked_curve(labels, scores))
