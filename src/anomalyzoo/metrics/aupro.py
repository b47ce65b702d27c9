"""AUPRO: area under the per-region-overlap curve up to a false-positive-rate limit.

Pixel AUROC is dominated by large defects: a method that finds one big scratch and misses five
small dents still scores well. The PRO metric (Bergmann et al., "The MVTec Anomaly Detection
Dataset", IJCV 2021, section 4.2) gives each connected defect region the same weight: at a
threshold ``t`` the PRO is the mean over regions of the fraction of the region's pixels with
``score >= t``. It is plotted against the false-positive rate on normal pixels and integrated up to
``fpr_limit`` (0.3 in the paper), because beyond that a segmentation is of no practical use.

Instead of labelling the thresholded maps once per threshold, we note that both axes are sums of
per-pixel weights over the pixels above the threshold: a defect pixel adds ``1 / (|region| *
n_regions)`` to the PRO and a normal pixel adds ``1 / n_normal`` to the FPR. One sort of all
pixels by score and two cumulative sums give the exact curve at every distinct score.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# 8-connectivity inside each image, nothing across images: labelling the (N, H, W) stack at once
# with this structure equals labelling every image on its own.
_PER_IMAGE_8_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_PER_IMAGE_8_CONNECTIVITY[1] = True


def _pixel_weights(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel contributions to the PRO axis and to the FPR axis (flattened, float64)."""
    regions, num_regions = ndimage.label(masks, structure=_PER_IMAGE_8_CONNECTIVITY)
    regions = regions.ravel()
    num_normal = int(regions.size - np.count_nonzero(regions))
    if num_regions == 0:
        raise ValueError("AUPRO needs at least one defect pixel in masks")
    if num_normal == 0:
        raise ValueError("AUPRO needs at least one normal pixel in masks")
    region_sizes = np.bincount(regions, minlength=num_regions + 1).astype(np.float64)
    weight_of_region = np.zeros(num_regions + 1)
    weight_of_region[1:] = 1.0 / (region_sizes[1:] * num_regions)
    pro_weights = weight_of_region[regions]  # label 0 (normal) gets weight 0
    fpr_weights = (regions == 0) / float(num_normal)
    return pro_weights, fpr_weights


def _exact_curve(scores: np.ndarray, pro_weights: np.ndarray, fpr_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct score, highest threshold first."""
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    pro = np.cumsum(pro_weights[order])
    fpr = np.cumsum(fpr_weights[order])
    # Pixels with equal scores cross the threshold together: keep only the last of each run.
    group_ends = np.append(np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1]), sorted_scores.size - 1)
    return fpr[group_ends], pro[group_ends]


def _binned_curve(
    scores: np.ndarray, pro_weights: np.ndarray, fpr_weights: np.ndarray, num_thresholds: int
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at ``num_thresholds`` evenly spaced thresholds, highest first (no sort needed)."""
    thresholds = np.linspace(scores.min(), scores.max(), num_thresholds)
    # bin k holds the pixels with thresholds[k] <= score < thresholds[k + 1] (the top bin is closed),
    # so the pixels predicted anomalous at thresholds[k] are those in bins k and above.
    bins = np.searchsorted(thresholds, scores, side="right") - 1
    pro = np.cumsum(np.bincount(bins, weights=pro_weights, minlength=num_thresholds)[::-1])
    fpr = np.cumsum(np.bincount(bins, weights=fpr_weights, minlength=num_thresholds)[::-1])
    return fpr, pro


def _normalised_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
    """Trapezoid area under PRO(FPR) from (0, 0) to ``fpr_limit``, divided by ``fpr_limit``."""
    fpr = np.concatenate(([0.0], fpr))
    pro = np.concatenate(([0.0], pro))
    # The curve's FPR reaches 1 (everything predicted anomalous); clip rounding above it.
    end = int(np.searchsorted(fpr, fpr_limit, side="left"))
    end = min(end, fpr.size - 1)
    if fpr[end] > fpr_limit:
        # Linear interpolation on the segment that crosses the limit, as the trapezoid assumes.
        fraction = (fpr_limit - fpr[end - 1]) / (fpr[end] - fpr[end - 1])
        pro_at_limit = pro[end - 1] + fraction * (pro[end] - pro[end - 1])
    else:
        pro_at_limit = pro[end]
    fpr_part = np.append(fpr[:end], fpr_limit)
    pro_part = np.append(pro[:end], pro_at_limit)
    area = np.sum(np.diff(fpr_part) * (pro_part[1:] + pro_part[:-1])) / 2.0
    return float(area / fpr_limit)


def aupro(
    masks: np.ndarray,
    anomaly_maps: np.ndarray,
    fpr_limit: float = 0.3,
    num_thresholds: int | None = None,
) -> float:
    """Normalised area under the PRO curve for FPR in ``[0, fpr_limit]`` (1.0 = perfect).

    ``masks`` and ``anomaly_maps`` are ``(N, H, W)``; regions are the 8-connected components of
    each image's mask, and images without defects contribute only normal pixels (to the FPR).
    With ``num_thresholds=None`` the curve is exact (one point per distinct score); with an integer
    it is sampled at that many evenly spaced thresholds, which avoids the sort for very large sets.
    """
    masks = np.asarray(masks)
    anomaly_maps = np.asarray(anomaly_maps)
    if masks.shape != anomaly_maps.shape:
        raise ValueError(f"masks {masks.shape} and anomaly_maps {anomaly_maps.shape} must have the same shape")
    if masks.ndim == 2:
        masks, anomaly_maps = masks[None], anomaly_maps[None]
    if masks.ndim != 3:
        raise ValueError(f"masks and anomaly_maps must be (N, H, W), got {masks.shape}")
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if num_thresholds is not None and num_thresholds < 2:
        raise ValueError(f"num_thresholds must be at least 2, got {num_thresholds}")
    if masks.dtype != bool:
        if not np.all((masks == 0) | (masks == 1)):
            raise ValueError("masks must be binary (0 = normal, 1 = defect)")
        masks = masks == 1
    scores = anomaly_maps.ravel()
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if np.isnan(scores).any():
        raise ValueError("anomaly_maps contain NaN")

    pro_weights, fpr_weights = _pixel_weights(masks)
    if num_thresholds is None:
        fpr, pro = _exact_curve(scores, pro_weights, fpr_weights)
    else:
        fpr, pro = _binned_curve(scores, pro_weights, fpr_weights, num_thresholds)
    return _normalised_area(fpr, pro, fpr_limit)
