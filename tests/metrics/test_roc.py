"""AUROC, average precision and F1-max against hand-computed values and a pairwise reference."""

from __future__ import annotations

import numpy as np
import pytest

from anomalyzoo.metrics import auroc, average_precision, compute_metrics, f1_max

# The scikit-learn documentation example: sorted by score the labels read 1, 0, 1, 0.
LABELS = np.array([0, 0, 1, 1])
SCORES = np.array([0.1, 0.4, 0.35, 0.8])


def pairwise_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney by definition: the share of (normal, anomalous) pairs ranked right, ties 1/2."""
    normal = scores[labels == 0][:, None]
    anomalous = scores[labels == 1][None, :]
    return float(np.mean((anomalous > normal) + 0.5 * (anomalous == normal)))


def test_auroc_hand_example() -> None:
    # Pairs (normal, anomalous): (0.1,0.35) (0.1,0.8) (0.4,0.8) right, (0.4,0.35) wrong -> 3/4.
    assert auroc(LABELS, SCORES) == pytest.approx(0.75)


def test_auroc_tie_counts_half() -> None:
    # Normals 0.2, 0.5; anomalies 0.5, 0.9: three pairs right and one tie -> 3.5 / 4.
    assert auroc([0, 1, 0, 1], [0.2, 0.5, 0.5, 0.9]) == pytest.approx(0.875)


def test_auroc_perfect_inverted_constant() -> None:
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert auroc([0, 0, 1, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_auroc_matches_pairwise_definition_with_many_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = rng.integers(0, 8, 300).astype(np.float32) + labels  # few distinct values: many ties
    assert auroc(labels, scores) == pytest.approx(pairwise_auroc(labels, scores), abs=1e-12)


def test_auroc_accepts_bool_labels_and_any_shape() -> None:
    labels = np.array([[False, False], [True, True]])
    scores = np.array([[0.1, 0.4], [0.35, 0.8]], dtype=np.float32)
    assert auroc(labels, scores) == pytest.approx(0.75)


@pytest.mark.parametrize("labels", [[0, 0, 0], [1, 1, 1]])
def test_auroc_single_class_raises(labels: list[int]) -> None:
    with pytest.raises(ValueError, match="both normal"):
        auroc(labels, [0.1, 0.2, 0.3])


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="binary"):
        auroc([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="same number"):
        auroc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0, 1, 1], [0.1, np.nan, 0.3])


def test_average_precision_hand_example() -> None:
    # Descending: 0.8 (P=1, R=1/2), 0.4 (P=1/2, R=1/2), 0.35 (P=2/3, R=1), 0.1 (P=1/2, R=1).
    # AP = 1/2 * 1 + 0 * 1/2 + 1/2 * 2/3 + 0 = 5/6.
    assert average_precision(LABELS, SCORES) == pytest.approx(5 / 6)


def test_average_precision_tie_is_one_step() -> None:
    # The tie at 0.5 (one anomalous, one normal) enters at once: P=1/2, R=1/2; then 0.2: P=2/3, R=1.
    assert average_precision([1, 0, 1], [0.5, 0.5, 0.2]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)


def test_average_precision_perfect_and_no_positive() -> None:
    assert average_precision([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    with pytest.raises(ValueError, match="anomalous"):
        average_precision([0, 0], [0.1, 0.2])


def test_f1_max_hand_example() -> None:
    # F1 at 0.8: 2/3, at 0.4: 1/2, at 0.35: TP=2 FP=1 -> 4/5, at 0.1: 2/3.
    best_f1, threshold = f1_max(LABELS, SCORES)
    assert best_f1 == pytest.approx(0.8)
    assert threshold == pytest.approx(0.35)


def test_f1_max_threshold_is_inclusive() -> None:
    # Only "score >= 0.7" separates perfectly; a strict ">" rule would give a different F1.
    best_f1, threshold = f1_max([0, 0, 1, 1], [0.1, 0.3, 0.7, 0.9])
    assert best_f1 == 1.0
    assert threshold == pytest.approx(0.7)


def test_compute_metrics_image_only_leaves_pixel_metrics_none() -> None:
    metrics = compute_metrics(LABELS, SCORES)
    assert metrics["image_auroc"] == pytest.approx(0.75)
    assert metrics["image_ap"] == pytest.approx(5 / 6)
    assert metrics["image_f1_max"] == pytest.approx(0.8)
    assert metrics["image_f1_threshold"] == pytest.approx(0.35)
    for name in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_f1_threshold", "pixel_aupro"):
        assert metrics[name] is None


def test_compute_metrics_with_masks_matches_individual_functions() -> None:
    rng = np.random.default_rng(1)
    masks = np.zeros((4, 16, 16), dtype=bool)
    masks[2, 3:7, 3:9] = True
    masks[3, 10:14, 2:5] = True
    maps = rng.random(masks.shape).astype(np.float32) + 0.7 * masks
    metrics = compute_metrics(LABELS, SCORES, masks, maps)
    assert metrics["pixel_auroc"] == pytest.approx(auroc(masks, maps))
    assert metrics["pixel_ap"] == pytest.approx(average_precision(masks, maps))
    assert (metrics["pixel_f1_max"], metrics["pixel_f1_threshold"]) == pytest.approx(f1_max(masks, maps))
    assert 0.0 < metrics["pixel_aupro"] <= 1.0


def test_compute_metrics_masks_without_defects_give_none() -> None:
    masks = np.zeros((4, 8, 8), dtype=bool)
    maps = np.random.default_rng(2).random(masks.shape)
    metrics = compute_metrics(LABELS, SCORES, masks, maps)
    assert metrics["pixel_auroc"] is None and metrics["pixel_aupro"] is None
    assert metrics["image_auroc"] == pytest.approx(0.75)


def test_pixel_auroc_on_mvtec_sized_float32_data() -> None:
    # 83 maps of 256 x 256 (the MVTec bottle test set) must be fast enough to run in a test.
    rng = np.random.default_rng(3)
    masks = rng.random((83, 256, 256), dtype=np.float32) < 0.02
    maps = rng.random((83, 256, 256), dtype=np.float32)
    assert auroc(masks, maps) == pytest.approx(0.5, abs=0.01)
    maps[masks] += 1.0  # every defect pixel above every normal one
    assert auroc(masks, maps) == 1.0
