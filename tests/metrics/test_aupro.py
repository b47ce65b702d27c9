"""AUPRO: hand-computed curves, region weighting, 8-connectivity and a per-threshold reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from anomalyzoo.metrics import aupro


def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """The definition, slowly: label each image, then at every distinct score average the overlaps."""
    region_scores = []  # the scores of each 8-connected region, image by image
    for mask, anomaly_map in zip(masks, maps):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
        region_scores += [anomaly_map[labelled == index] for index in range(1, count + 1)]
    normal_scores = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        fprs.append(np.mean(normal_scores >= threshold))
        pros.append(np.mean([np.mean(scores >= threshold) for scores in region_scores]))
    fprs, pros = np.array(fprs), np.array(pros)
    pro_at_limit = np.interp(fpr_limit, fprs, pros)  # fprs is non-decreasing
    keep = fprs < fpr_limit
    x = np.append(fprs[keep], fpr_limit)
    y = np.append(pros[keep], pro_at_limit)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / fpr_limit)


def test_perfect_map_gives_one() -> None:
    masks = np.zeros((3, 32, 32), dtype=bool)
    masks[0, 4:10, 4:10] = True
    masks[1, 20:30, 2:5] = True
    maps = np.random.default_rng(0).random(masks.shape) * 0.5 + masks
    assert aupro(masks, maps) == pytest.approx(1.0)


def test_one_of_two_regions_found_gives_half_whatever_their_sizes() -> None:
    # A small region found perfectly, a large one scored below every normal pixel. Per-pixel
    # weighting would give ~0.04 (4 of 104 defect pixels); per-region weighting gives 0.5.
    masks = np.zeros((2, 32, 32), dtype=bool)
    masks[0, 2:4, 2:4] = True  # 4 pixels, found
    masks[1, 5:15, 5:15] = True  # 100 pixels, missed
    rng = np.random.default_rng(1)
    maps = 0.2 + 0.5 * rng.random(masks.shape)
    maps[0, 2:4, 2:4] = 1.0
    maps[1, 5:15, 5:15] = 0.0
    assert aupro(masks, maps) == pytest.approx(0.5)


def test_hand_computed_curve_with_regions_of_different_sizes() -> None:
    # One row: a 1-pixel region (index 0) and a 3-pixel region (2..4); 4 normal pixels.
    mask = np.array([[[1, 0, 1, 1, 1, 0, 0, 0]]], dtype=bool)
    scores = np.array([[[0.2, 0.6, 0.9, 0.8, 0.1, 0.7, 0.05, 0.3]]])
    # Descending: 0.9 d(+1/6) 0.8 d(+1/6) 0.7 n 0.6 n 0.3 n 0.2 d(+1/2) 0.1 d(+1/6) 0.05 n.
    # PRO is 1/3 for FPR in [0, 0.75], then 1 from FPR 0.75 to 1.
    assert aupro(mask, scores, fpr_limit=1.0) == pytest.approx(1 / 3 * 0.75 + 0.25)
    assert aupro(mask, scores, fpr_limit=0.5) == pytest.approx(1 / 3)


def test_tied_scores_interpolate_linearly() -> None:
    # A defect pixel and a normal pixel with the same score: the curve goes straight from (0,0) to (1,1).
    mask = np.array([[[1, 0]]], dtype=bool)
    scores = np.array([[[0.5, 0.5]]])
    assert aupro(mask, scores, fpr_limit=1.0) == pytest.approx(0.5)
    assert aupro(mask, scores, fpr_limit=0.5) == pytest.approx(0.25)  # area 0.125 / 0.5


def test_regions_are_8_connected() -> None:
    # A diagonal pair is one region (8-connectivity), the isolated pixel another. Hitting one pixel
    # of the pair gives PRO 1/4; with 4-connectivity it would be three regions and PRO 1/3.
    mask = np.zeros((1, 8, 8), dtype=bool)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 6, 6] = True
    scores = np.full((1, 8, 8), 0.5)
    scores[mask] = 0.0
    scores[0, 0, 0] = 1.0
    assert aupro(mask, scores) == pytest.approx(0.25)


def test_defect_free_images_add_false_positives_only() -> None:
    masks = np.zeros((2, 16, 16), dtype=bool)
    masks[0, 4:8, 4:8] = True
    maps = masks.astype(np.float64)
    assert aupro(masks, maps) == pytest.approx(1.0)
    maps[1] = 2.0  # the defect-free image outscores the defect: all its pixels are false positives
    assert aupro(masks, maps) < 0.5


def test_matches_per_threshold_reference() -> None:
    rng = np.random.default_rng(2)
    masks = np.zeros((4, 12, 12), dtype=bool)
    masks[0, 2:5, 2:6] = True
    masks[0, 8:11, 9:11] = True
    masks[2, 5:9, 1:3] = True
    masks[3, 0, 0] = masks[3, 1, 1] = True
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 2)  # rounding makes ties
    for fpr_limit in (0.05, 0.3, 1.0):
        assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(reference_aupro(masks, maps, fpr_limit))


def test_binned_thresholds_approximate_the_exact_curve() -> None:
    rng = np.random.default_rng(3)
    masks = np.zeros((6, 64, 64), dtype=bool)
    masks[0, 10:30, 10:20] = True
    masks[3, 40:44, 5:60] = True
    maps = rng.random(masks.shape) + 0.5 * masks
    exact = aupro(masks, maps)
    assert aupro(masks, maps, num_thresholds=2000) == pytest.approx(exact, abs=0.01)


def test_invalid_inputs_raise() -> None:
    masks = np.zeros((2, 8, 8), dtype=bool)
    maps = np.zeros((2, 8, 8))
    with pytest.raises(ValueError, match="defect pixel"):
        aupro(masks, maps)
    with pytest.raises(ValueError, match="same shape"):
        aupro(masks, np.zeros((2, 8, 9)))
    masks[0, 0, 0] = True
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)


def test_random_maps_on_mvtec_bottle_size() -> None:
    # 83 maps of 256 x 256 with uninformative scores: PRO follows FPR, so the normalised area up
    # to 0.3 is about (0.3^2 / 2) / 0.3 = 0.15. This runs the exact path at full size.
    rng = np.random.default_rng(4)
    masks = np.zeros((83, 256, 256), dtype=bool)
    for index in range(0, 83, 2):
        top, left = rng.integers(0, 200, size=2)
        masks[index, top : top + rng.integers(4, 50), left : left + rng.integers(4, 50)] = True
    maps = rng.random(masks.shape, dtype=np.float32)
    assert aupro(masks, maps) == pytest.approx(0.15, abs=0.02)
