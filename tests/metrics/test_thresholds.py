"""Threshold analysis: the four candidates and their confusion counts on a hand case."""

from __future__ import annotations

import numpy as np
import pytest

from anomalyzoo.metrics import ThresholdRow, evaluate_threshold, threshold_analysis

LABELS = np.array([0, 0, 0, 0, 1, 1])
SCORES = np.array([0.1, 0.2, 0.3, 0.4, 0.35, 0.9])


def rows_by_name() -> dict[str, ThresholdRow]:
    return {row.name: row for row in threshold_analysis(LABELS, SCORES)}


def test_candidates_in_order() -> None:
    assert [row.name for row in threshold_analysis(LABELS, SCORES)] == [
        "f1_optimal",
        "normal_p95",
        "normal_p99",
        "zero_miss",
    ]


def test_f1_optimal_row() -> None:
    # F1 at 0.9: 2/3, at 0.4: 1/2, at 0.35: TP=2 FP=1 -> 0.8 (the best).
    row = rows_by_name()["f1_optimal"]
    assert row.threshold == pytest.approx(0.35)
    assert (row.tp, row.fp, row.tn, row.fn) == (2, 1, 3, 0)
    assert row.f1 == pytest.approx(0.8)
    assert row.precision == pytest.approx(2 / 3)
    assert row.recall == 1.0
    assert row.fpr == pytest.approx(0.25)


def test_normal_percentile_rows() -> None:
    # Normals 0.1, 0.2, 0.3, 0.4: the 95th percentile sits at position 2.85 -> 0.3 + 0.85 * 0.1.
    rows = rows_by_name()
    p95 = rows["normal_p95"]
    assert p95.threshold == pytest.approx(0.385)
    # Flagged: 0.4 (normal) and 0.9 (anomalous); 0.35 is missed.
    assert (p95.tp, p95.fp, p95.tn, p95.fn) == (1, 1, 3, 1)
    assert p95.precision == pytest.approx(0.5)
    assert p95.recall == pytest.approx(0.5)
    assert rows["normal_p99"].threshold == pytest.approx(0.397)


def test_zero_miss_row_is_lowest_anomalous_score() -> None:
    row = rows_by_name()["zero_miss"]
    assert row.threshold == pytest.approx(0.35)
    assert row.fn == 0
    assert (row.tp, row.fp, row.tn) == (2, 1, 3)


def test_nothing_predicted_has_zero_precision() -> None:
    row = evaluate_threshold(LABELS, SCORES, 5.0, name="too_high")
    assert (row.tp, row.fp, row.tn, row.fn) == (0, 0, 4, 2)
    assert row.precision == 0.0
    assert row.recall == 0.0
    assert row.f1 == 0.0
    assert row.name == "too_high"


def test_single_class_raises() -> None:
    with pytest.raises(ValueError, match="both normal"):
        threshold_analysis([0, 0, 0], [0.1, 0.2, 0.3])
