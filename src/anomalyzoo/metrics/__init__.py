"""Evaluation metrics: plain functions on numpy arrays (score 1 = anomalous).

Image level: AUROC, average precision and the best F1 over per-image scores. Pixel level: the same
three over every pixel of the anomaly maps, plus AUPRO, which weights each defect region equally.
"""

from __future__ import annotations

import numpy as np

from anomalyzoo.metrics.aupro import aupro
from anomalyzoo.metrics.roc import (
    auroc,
    auroc_from_curve,
    average_precision,
    average_precision_from_curve,
    f1_max,
    f1_max_from_curve,
    ranked_curve,
)
from anomalyzoo.metrics.thresholds import ThresholdRow, evaluate_threshold, threshold_analysis

__all__ = [
    "ThresholdRow",
    "aupro",
    "auroc",
    "average_precision",
    "compute_metrics",
    "evaluate_threshold",
    "f1_max",
    "threshold_analysis",
]

METRIC_NAMES = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "image_f1_threshold",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_f1_threshold",
    "pixel_aupro",
)


def compute_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    masks: np.ndarray | None = None,
    anomaly_maps: np.ndarray | None = None,
) -> dict[str, float | None]:
    """Every image- and pixel-level metric of one test run, keyed by :data:`METRIC_NAMES`.

    ``labels``/``scores`` are per image (both classes must be present, else ``ValueError``);
    ``masks``/``anomaly_maps`` are ``(N, H, W)``. The pixel metrics are ``None`` when either is
    missing or when the masks cannot support them (no defect pixel, as for datasets without
    ground truth, or no normal pixel). The pixel curve is sorted once and shared by AUROC, AP and
    F1, because on millions of pixels the sort is the whole cost.
    """
    image_curve = ranked_curve(labels, scores)
    image_f1, image_threshold = f1_max_from_curve(image_curve)
    metrics: dict[str, float | None] = {
        "image_auroc": auroc_from_curve(image_curve),
        "image_ap": average_precision_from_curve(image_curve),
        "image_f1_max": image_f1,
        "image_f1_threshold": image_threshold,
        "pixel_auroc": None,
        "pixel_ap": None,
        "pixel_f1_max": None,
        "pixel_f1_threshold": None,
        "pixel_aupro": None,
    }
    if masks is None or anomaly_maps is None:
        return metrics
    masks = np.asarray(masks)
    anomaly_maps = np.asarray(anomaly_maps)
    if masks.shape != anomaly_maps.shape:
        raise ValueError(f"masks {masks.shape} and anomaly_maps {anomaly_maps.shape} must have the same shape")
    num_defect_pixels = int(np.count_nonzero(masks))
    if num_defect_pixels == 0 or num_defect_pixels == masks.size:
        return metrics
    pixel_curve = ranked_curve(masks, anomaly_maps)
    pixel_f1, pixel_threshold = f1_max_from_curve(pixel_curve)
    metrics.update(
        pixel_auroc=auroc_from_curve(pixel_curve),
        pixel_ap=average_precision_from_curve(pixel_curve),
        pixel_f1_max=pixel_f1,
        pixel_f1_threshold=pixel_threshold,
        pixel_aupro=aupro(masks, anomaly_maps),
    )
    return metrics
